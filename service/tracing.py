"""OpenTelemetry tracing, off unless `NORMSERVE_TRACING=true` (docs/tracing.md).

Everything else is the standard `OTEL_*` environment that the OpenTelemetry SDK reads itself:
`OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` (OTLP over HTTP, protobuf), `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_BSP_*`; `OTEL_SDK_DISABLED=true`
turns tracing off whatever `NORMSERVE_TRACING` says. The packages come with the `tracing` extra
(the Docker images have it); this module imports them only when tracing is on.

One `Tracing` per app: `create_app` makes it (an SDK `TracerProvider`, which starts no thread)
and instruments the app with the official FastAPI (ASGI) instrumentation, which then owns the
server span of each request and honours an incoming W3C `traceparent`. The lifespan, which runs
in each worker process, starts the batch exporter (`start`) and flushes it at shutdown
(`shutdown`), so each worker exports on a thread of its own.

Inside a request's server span:

- `read`, `decode`, `encode`: the routes' stages (`stage(request, name)`);
- `queue`: from the request entering its model's batcher to its batch starting (a child of the
  request, linked to the run that served it);
- `run`: one span per batch run, with the model, version and batch size, linked to the span of
  every request it served; its parent is the first request in the batch that is sampled (a
  batch run belongs to several traces; the others reach it through their queue span's link).

Off, no OpenTelemetry code runs: no middleware is added, and each stage is one `is None` test
that enters a shared no-op context.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from normserve import __version__
from normserve.service.state import request_state

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

log = logging.getLogger("normserve.tracing")

NO_SPAN: AbstractContextManager[None] = nullcontext()
EXTRA_HINT = "from the normserve checkout: pip install -e '.[tracing]' (the Docker images have it)"
# Requests to these paths get no trace (probes and scrapes every few seconds would drown the
# rest); OTEL_PYTHON_FASTAPI_EXCLUDED_URLS or OTEL_PYTHON_EXCLUDED_URLS replace the list.
DEFAULT_EXCLUDED_URLS = r"/v2/health/.*,/metrics"
REQUIRED_MODULES = (
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.instrumentation.fastapi",
)

# Span attributes (no OpenTelemetry semantic convention covers model serving yet).
MODEL = "normserve.model.name"
VERSION = "normserve.model.version"
BATCH_SIZE = "normserve.batch.size"  # rows in the run
BATCH_REQUESTS = "normserve.batch.requests"  # requests that share the run
REQUEST_ROWS = "normserve.request.rows"  # rows this request brought


class TracingUnavailable(RuntimeError):
    """Tracing is on but the `tracing` extra is not installed."""


def sdk_disabled() -> bool:
    """`OTEL_SDK_DISABLED=true`: the specification's switch that turns the whole SDK off."""
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def require_packages() -> None:
    """Raise `TracingUnavailable` naming the install command when the extra is missing."""
    for module in REQUIRED_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise TracingUnavailable(
                f"NORMSERVE_TRACING is on but the tracing extra is not installed ({exc.name} is missing): {EXTRA_HINT}"
            ) from None


@dataclass(frozen=True, slots=True)
class QueueMark:
    """Where and when one request entered a batcher's queue."""

    context: Context  # the request's context (its current span is the request's span)
    enqueued_ns: int
    rows: int


class Tracing:
    """One app's tracer provider, tracer and instrumentation (see the module's docstring)."""

    def __init__(self) -> None:
        require_packages()
        from opentelemetry import context, trace
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider

        detected = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
        attributes = dict(detected.attributes)
        if str(attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            attributes[SERVICE_NAME] = "normserve"
        attributes.setdefault(SERVICE_VERSION, __version__)
        attributes.setdefault("process.pid", os.getpid())  # which worker process served it
        # The sampler comes from OTEL_TRACES_SAMPLER(_ARG) (default: parentbased_always_on).
        self.provider = TracerProvider(resource=Resource(attributes, detected.schema_url))
        self.tracer = self.provider.get_tracer("normserve", __version__)
        self._trace = trace
        self._context = context

    # -- set-up --------------------------------------------------------------------------------
    def instrument(self, app: FastAPI) -> None:
        """The server span of every HTTP request (but `DEFAULT_EXCLUDED_URLS`), by the official
        FastAPI instrumentation, outside every other middleware. Call before the app serves."""
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        own = os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS") or os.environ.get("OTEL_PYTHON_EXCLUDED_URLS")
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self.provider,
            excluded_urls=None if own else DEFAULT_EXCLUDED_URLS,  # None: the instrumentation reads the env
            exclude_spans=["receive", "send"],  # one span per ASGI message is noise here
        )

    def start(self, exporter: SpanExporter | None = None) -> None:
        """Export finished spans in batches from a thread of this process (in the lifespan, so in
        each worker process): to the OTLP/HTTP endpoint of OTEL_EXPORTER_OTLP_*, or `exporter`."""
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        self.provider.add_span_processor(BatchSpanProcessor(exporter))

    def shutdown(self) -> None:
        """Export what is still buffered and stop the exporter's thread."""
        self.provider.shutdown()

    def grpc_server_interceptors(self) -> list[Any]:
        """Interceptors for `grpc.aio.server(interceptors=...)`: a SERVER span per RPC by the
        official gRPC instrumentation (an incoming `traceparent` in the metadata is honoured),
        current while the handler runs, so its stages and batcher spans nest under it."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(tracer_provider=self.provider)]

    # -- per request ---------------------------------------------------------------------------
    def span(self, name: str) -> AbstractContextManager[Span]:
        """A child span of the current one, current while the block runs."""
        return self.tracer.start_as_current_span(name)

    def enqueued(self, rows: int) -> QueueMark:
        """On the event loop, when a request enters a batcher."""
        return QueueMark(self._context.get_current(), time.time_ns(), rows)

    def batch_started(self, model: str, version: str, marks: Sequence[QueueMark]) -> AbstractContextManager[Span]:
        """In the inference thread, as a batch starts: end each request's `queue` span and start
        the batch's `run` span (linked both ways), which ends when the returned context exits (an
        exception in it is recorded on the span)."""
        from opentelemetry.trace import Link

        get_span = self._trace.get_current_span
        started = time.time_ns()
        requests = [get_span(m.context).get_span_context() for m in marks]
        parent = next((m for m, sc in zip(marks, requests, strict=True) if sc.trace_flags.sampled), marks[0])
        run = self.tracer.start_span(
            "run",
            context=parent.context,
            links=[Link(sc) for sc in requests if sc.is_valid],
            start_time=started,
            attributes={
                MODEL: model,
                VERSION: version,
                BATCH_SIZE: sum(m.rows for m in marks),
                BATCH_REQUESTS: len(marks),
            },
        )
        to_run = [Link(run.get_span_context())]
        attributes = {MODEL: model, VERSION: version}
        for m in marks:
            queue = self.tracer.start_span(
                "queue",
                context=m.context,
                links=to_run,
                start_time=m.enqueued_ns,
                attributes={**attributes, REQUEST_ROWS: m.rows},
            )
            queue.end(end_time=started)
        return self._trace.use_span(run, end_on_exit=True)

    def queue_abandoned(self, model: str, version: str, mark: QueueMark, why: str) -> None:
        """A request left the queue without running (timed out, or its client went away)."""
        from opentelemetry.trace import Status, StatusCode

        queue = self.tracer.start_span(
            "queue",
            context=mark.context,
            start_time=mark.enqueued_ns,
            attributes={MODEL: model, VERSION: version, REQUEST_ROWS: mark.rows},
        )
        queue.set_status(Status(StatusCode.ERROR, why))
        queue.end()

    def current_ids(self) -> tuple[str | None, str | None]:
        """The current span's trace id and span id (hex), or Nones outside a trace."""
        sc = self._trace.get_current_span().get_span_context()
        if not sc.is_valid:
            return None, None
        return self._trace.format_trace_id(sc.trace_id), self._trace.format_span_id(sc.span_id)


def from_settings(enabled: bool) -> Tracing | None:
    """The app's tracing, or None when off (NORMSERVE_TRACING unset, or OTEL_SDK_DISABLED=true)."""
    if not enabled:
        return None
    if sdk_disabled():
        log.info("NORMSERVE_TRACING is on but OTEL_SDK_DISABLED=true: no tracing")
        return None
    return Tracing()


def span(tracing: Tracing | None, name: str) -> AbstractContextManager[Any]:
    """`tracing.span(name)`, or the shared no-op context when tracing is off."""
    return NO_SPAN if tracing is None else tracing.span(name)


def stage(request: Request, name: str) -> AbstractContextManager[Any]:
    """A span for one stage of an HTTP request's handling (read, decode, encode)."""
    tracing = request_state(request).tracing
    return NO_SPAN if tracing is None else tracing.span(name)
