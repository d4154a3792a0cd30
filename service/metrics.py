"""Prometheus metrics (prometheus-client), correct with several worker processes.

Each app gets its own registry (tests build many apps); with `PROMETHEUS_MULTIPROC_DIR` set —
`normserve serve --workers N` sets it — values go to shared files and `/metrics` aggregates
every worker through `MultiProcessCollector`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from normserve.service.state import request_state

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "normserve_requests",
            "HTTP requests by endpoint, model and status",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.failures = Counter(
            "normserve_failures", "Failed requests by endpoint and reason", ["endpoint", "reason"], registry=r
        )
        self.request_seconds = Histogram(
            "normserve_request_duration_seconds",
            "Whole-request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "normserve_queue_duration_seconds",
            "Time from arrival until its batch starts running",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "normserve_compute_duration_seconds",
            "ONNX Runtime run time",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "normserve_batch_size", "Rows per model run (a dynamic batch)", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.in_flight = Gauge(
            "normserve_requests_in_flight", "Requests being handled", registry=r, multiprocess_mode="livesum"
        )
        self.queue_depth = Gauge(
            "normserve_queue_depth",
            "Requests queued for a batch",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_ready = Gauge(
            "normserve_model_ready",
            "1 when the model version is ready, with the execution provider in use",
            ["model", "version", "provider"],
            registry=r,
            multiprocess_mode="liveall",
        )

    def render(self) -> bytes:
        if multiprocess_enabled():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


def _endpoint(scope: Scope) -> str:
    """The matched route's template (`/v2/models/{name}/infer`), never the raw path, so label
    values stay bounded; the router records the route in the scope it shares with us."""
    route: Any = scope.get("route")
    return str(getattr(route, "path", "other"))


class MetricsMiddleware:
    """Counts and times every HTTP request; the model label comes from `scope["state"]["model"]`."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # (endpoint, model, status) -> its request counter and the endpoint's latency histogram,
        # looked up once (`labels()` takes a lock on every call); the label values are bounded
        self._series: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            endpoint = _endpoint(scope)
            model = str(scope.get("state", {}).get("model", ""))
            key = (endpoint, model, str(status))
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = (
                    self.metrics.requests.labels(*key),
                    self.metrics.request_seconds.labels(endpoint),
                )
            series[0].inc()
            series[1].observe(time.perf_counter() - started)
            if status >= 400:
                reason = str(scope.get("state", {}).get("error", f"http_{status}"))
                self.metrics.failures.labels(endpoint, reason).inc()


router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    return Response(request_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
