"""Dependencies that reach lifespan-owned state (settings, repository, batchers) through the app."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import Depends, Request

from normserve.service.governor import request_deadline
from normserve.service.model import ServedModel
from normserve.service.repository import ModelRepository
from normserve.service.settings import Settings
from normserve.service.v2_infer import submit


async def get_settings_dep(request: Request) -> Settings:
    # async: a plain `def` dependency costs a threadpool hop per request for a dict lookup.
    settings: Settings = request.app.state.settings
    return settings


async def get_repository(request: Request) -> ModelRepository:
    repository: ModelRepository = request.app.state.repository
    return repository


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]


async def run_inference(
    request: Request, model: ServedModel, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Run a model through its dynamic batcher (off the event loop); this request's rows come back.

    Leaves `model`, `model_version` and `batch_size` (rows of the run this request was part of)
    in `request.state` for the metrics and access-log middleware.
    """
    return await submit(
        request.app.state.batchers, model, inputs, outputs, request.state, deadline=request_deadline(request)
    )
