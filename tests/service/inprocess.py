"""Run the real app in-process on the test's own event loop, for tests that need concurrent
requests and control over the inference thread (queueing, batching, timeouts).

`serving(settings)` runs the app's lifespan (models load, their batchers start) and yields the app and
an httpx client over ASGI. `ExecutorGate` occupies the single inference thread until released,
so requests pile up in the batchers deterministically instead of by timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from normserve.service.app import create_app
from normserve.service.batching import ModelBatcher
from normserve.service.settings import Settings
from normserve.service.state import server_state

WAIT_S = 30.0  # upper bound for conditions that hold within milliseconds; only a bug reaches it


@asynccontextmanager
async def serving(
    settings: Settings, outer_middleware: type | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The started app and a client; `outer_middleware` (an ASGI class) wraps everything."""
    app = create_app(settings)
    if outer_middleware is not None:
        app.add_middleware(outer_middleware)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://normserve") as client,
    ):
        yield app, client


class ExecutorGate:
    """Holds every inference thread of the app (one per model instance) busy until `release()`."""

    def __init__(self, app: FastAPI) -> None:
        self._open = threading.Event()
        threads = server_state(app).settings.instances()
        self._held = threading.Semaphore(0)
        for _ in range(threads):
            server_state(app).executor.submit(self._hold)
        for _ in range(threads):
            if not self._held.acquire(timeout=WAIT_S):
                raise AssertionError("the inference threads never became free")

    def _hold(self) -> None:
        self._held.release()
        self._open.wait(WAIT_S)

    def release(self) -> None:
        self._open.set()


def batchers(app: Any) -> dict[str, ModelBatcher]:
    """The batchers of the versions the app serves (each started version owns one), by `name/version`."""
    return {m.key: m.batcher for m in server_state(app).repository.all() if m.batcher is not None}


def batcher(app: Any, key: str) -> ModelBatcher:
    return batchers(app)[key]


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the event loop until `condition()` holds (a state, not a duration, is awaited)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.002)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`, from Prometheus text."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                total += s.value
    return total


def v2_request(x: Any, outputs: list[str] | None = None) -> dict[str, Any]:
    """A JSON V2 inference request for input `image`."""
    body: dict[str, Any] = {
        "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    if outputs is not None:
        body["outputs"] = [{"name": n} for n in outputs]
    return body
