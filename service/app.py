"""`create_app(settings)`: the FastAPI application and its lifespan.

The lifespan owns everything stateful — the model repository with its versions (each with its
ONNX Runtime sessions and dynamic batcher), the inference thread pool, the poller — in one typed
`ServerState` (state.py), so nothing lives in module globals and tests get a fresh app.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import onnxruntime as ort
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from normserve import __version__
from normserve.service import v2_protocol
from normserve.service.access_log import REQUEST_ID_HEADER, AccessLogMiddleware, configure_access_logger
from normserve.service.budget import MIB, DecodeGate, MemoryBudget
from normserve.service.cores import CoreLock
from normserve.service.errors import error_responses, register_error_handlers
from normserve.service.governor import RequestGovernor
from normserve.service.grpc_server import GrpcServer
from normserve.service.memory import MemoryTrimmer, limit_malloc_arenas
from normserve.service.metrics import Metrics, MetricsMiddleware
from normserve.service.metrics import router as metrics_router
from normserve.service.middleware import BodySizeLimitMiddleware, JsonCORSMiddleware
from normserve.service.model import Runtime
from normserve.service.poller import RepositoryPoller
from normserve.service.raw_routes import RawRoutes
from normserve.service.repository import ModelRepository
from normserve.service.routes import docs, images, ui, v2
from normserve.service.security import ApiKey
from normserve.service.settings import Settings, get_settings
from normserve.service.shutdown import DRAIN_STATE_KEY, Drain, DrainMiddleware
from normserve.service.state import STATE_KEY, ServerState
from normserve.service.tracing import from_settings as tracing_from_settings
from normserve.service.workers import WorkerRoster

log = logging.getLogger("normserve")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("normserve").setLevel(level.upper())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    _configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        limit_malloc_arenas(settings.malloc_arenas)  # before the sessions' and the pool's threads start
        log.info("onnxruntime %s, available providers %s", ort.__version__, ort.get_available_providers())
        # Shared with this server's other workers: core locks and readiness marks.
        runtime_dir = settings.runtime_dir or Path(tempfile.mkdtemp(prefix="normserve-run-"))
        workers = WorkerRoster(runtime_dir)
        repository = ModelRepository(settings.model_repository, settings, CoreLock(runtime_dir))
        state = ServerState(
            settings=settings,
            repository=repository,
            metrics=metrics,
            drain=drain,
            budget=budget,
            # One inference thread per model instance: that many ORT runs at a time in this process,
            # each parallel inside on intra-op threads (instances x intra-op threads = the worker's cores).
            executor=ThreadPoolExecutor(max_workers=settings.instances(), thread_name_prefix="ort"),
            workers=workers,
            tracing=tracing,
            json_limiter=anyio.CapacityLimiter(v2.JSON_PARSE_THREADS),
            decode_gate=DecodeGate(settings.serial_decode_pixels),
        )
        setattr(app.state, STATE_KEY, state)
        if tracing is not None:
            tracing.start()  # the exporter's thread, in this worker process
        await run_in_threadpool(repository.load_all)
        log.info("serving %s", {m.key: m.state.value for m in repository.all()})
        for m in repository.all():
            metrics.model_ready.labels(m.name, m.version, m.provider or "none").set(1 if m.ready else 0)
        repository.serve(Runtime(state.executor, metrics, tracing))  # each ready version's batcher starts
        poller = state.poller = RepositoryPoller(repository, metrics, settings)
        if settings.repository_poll_s > 0:
            poller.start()
        # gRPC: with tracing on, the official instrumentation's span per RPC (decode/queue/run nest under it)
        interceptors = tracing.grpc_server_interceptors() if tracing is not None else []
        grpc_server = state.grpc = GrpcServer(state, interceptors) if settings.grpc else None
        # Everything start-up made (sessions, FastAPI's routes and models, ...) lives as long as
        # the process: frozen out of the collector, so a full collection under load no longer
        # walks it (measured: 30-40 ms pauses about once a second at /classify c=32; ~2 ms after).
        gc.collect()
        gc.freeze()
        trimmer = state.trimmer = MemoryTrimmer(drain, settings.memory_trim_idle_s, repository)
        trimmer.start()  # memory back to the system once quiet after a burst (service/memory.py)
        try:
            # gRPC on its own port, before the worker reports ready: readiness covers both
            # protocols; a port it cannot take stops start-up (and what started is stopped).
            if grpc_server is not None:
                await grpc_server.start()
            state.workers.mark_ready()
            # lifespan state, copied into every request's scope: how the server (shutdown.py)
            # reaches the drain, and requests their server's state (state.request_state)
            yield {DRAIN_STATE_KEY: drain, STATE_KEY: state}
        finally:
            if grpc_server is not None:  # stopped taking calls when draining began; those in flight finish
                await grpc_server.stop()
            await trimmer.stop()
            await poller.stop()  # before the batchers: a rescan must not start new ones
            await repository.drain_all()  # each version runs what is still queued first
            state.executor.shutdown(wait=True)
            repository.stop_all()
            state.workers.leave()
            if tracing is not None:
                tracing.shutdown()  # exports what is still buffered
            if settings.runtime_dir is None:
                shutil.rmtree(runtime_dir, ignore_errors=True)
            gc.unfreeze()
            log.info("stopped")

    app = FastAPI(
        title="normserve",
        summary="GroupNorm classifier and InstanceNorm denoiser on ONNX Runtime",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from routes/docs.py, with assets served locally (no CDN)
        redoc_url=None,
    )
    metrics = Metrics()
    drain = Drain()
    budget = MemoryBudget(settings.worker_memory_mb * MIB, settings.memory_wait_s)  # this worker's (budget.py)
    tracing = tracing_from_settings(settings.tracing)
    if settings.raw_routes:  # innermost: the hot routes answered below FastAPI's routing (raw_routes.py)
        raw = {"/classify": images.classify_raw, **v2.RAW_ROUTES}
        app.add_middleware(RawRoutes, routers=[images.router, v2.infer_router], endpoints=raw)
    # the deadline, disconnects and memory reservations of every POST (governor.py)
    app.add_middleware(RequestGovernor, budget=budget, timeout_s=settings.request_timeout_s)
    app.add_middleware(
        BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes, discard_bytes=settings.max_discard_bytes
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # sees every API request, 413s too
    if settings.cors_origins:  # closed by default: without the setting, no CORS headers at all
        app.add_middleware(
            JsonCORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept", REQUEST_ID_HEADER, v2_protocol.HEADER_LENGTH],
            expose_headers=[REQUEST_ID_HEADER, "X-Model", v2_protocol.HEADER_LENGTH],
        )
    app.add_middleware(DrainMiddleware, drain=drain)
    if settings.access_log:
        configure_access_logger()
    app.add_middleware(  # outermost of ours: every response (tracing's middleware wraps it, to give it the ids)
        AccessLogMiddleware, enabled=settings.access_log, trace_ids=None if tracing is None else tracing.current_ids
    )
    register_error_handlers(app)
    # The routes that run a model need the API key (when one is set); the others stay open.
    app.include_router(images.router, dependencies=[ApiKey], responses=error_responses(401))
    app.include_router(v2.router)
    app.include_router(v2.infer_router, dependencies=[ApiKey], responses=error_responses(401))
    app.include_router(metrics_router)
    app.include_router(ui.router)
    app.include_router(docs.router)
    if tracing is not None:
        tracing.instrument(app)  # a server span per request, around every middleware
    return app
