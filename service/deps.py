"""Dependencies that reach lifespan-owned state (settings, repository, executor) through the app."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import numpy as np
from fastapi import Depends, Request

from service.metrics import Metrics
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
    metrics: Metrics = request.app.state.metrics
    request.state.model = model.name
    queued = time.perf_counter()
    rows = next(iter(inputs.values())).shape[0] if inputs else 0

    def timed() -> dict[str, np.ndarray]:
        started = time.perf_counter()
        metrics.queue_depth.labels(model.name).dec()
        metrics.queue_seconds.labels(model.name).observe(started - queued)
        try:
            return model.predict(inputs, outputs)
        finally:
            metrics.compute_seconds.labels(model.name, model.version).observe(time.perf_counter() - started)
            metrics.batch_size.labels(model.name).observe(rows)

    metrics.queue_depth.labels(model.name).inc()
    return await asyncio.get_running_loop().run_in_executor(executor, timed)
