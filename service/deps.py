"""Dependencies that reach lifespan-owned state (settings, repository, executor) through the app."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import numpy as np
from fastapi import Depends, Request

from service.model import ServedModel
from service.repository import ModelRepository
from service.settings import Settings


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_repository(request: Request) -> ModelRepository:
    repository: ModelRepository = request.app.state.repository
    return repository


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]


async def run_inference(
    request: Request, model: ServedModel, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Run a model on the inference executor, off the event loop."""
    executor: ThreadPoolExecutor = request.app.state.executor
    return await asyncio.get_running_loop().run_in_executor(executor, model.predict, inputs, outputs)
