"""OpenTelemetry tracing (service/tracing.py): the spans a real `normserve serve` exports over
OTLP/HTTP to a real receiver (otlp_receiver.py), decoded with the official protobuf messages.

The span tree of one /classify, one V2 infer over HTTP and one over gRPC (an incoming `traceparent` honoured, the access
log carrying the ids), one run span per batch linked to every request it served, the sampler and
the off switches, and the gRPC server interceptor on a grpc.aio server of the test's own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import shipped
from conftest import SettingsFactory, make_settings
from fastapi.testclient import TestClient
from images import image_bytes
from inprocess import ExecutorGate, batcher, serving, until, v2_request
from otlp_receiver import OtlpReceiver, Span, otlp_receiver
from servers import REPO_ROOT, Server, running_server

from normserve.service import tracing as tracing_module
from normserve.service.access_log import LOGGER_NAME
from normserve.service.app import create_app
from normserve.service.errors import InferenceError, RequestTimeout
from normserve.service.state import server_state
from normserve.service.tracing import BATCH_REQUESTS, BATCH_SIZE, MODEL, REQUEST_ROWS, VERSION, Tracing

STAGES = ["read", "decode", "queue", "run", "encode"]  # a request's spans, in the order they happen
V2_INFER = "/v2/models/gncnn/infer"
PNG = {"content-type": "image/png"}
INPUT = shipped.config("gncnn")["inputs"][0]["name"]


def _env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    return {
        "NORMSERVE_TRACING": "true",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "normserve-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms between exports: the test waits less
        **extra,
    }


def _traceparent() -> tuple[str, str, str]:
    """A fresh (trace id, parent span id, header) as an upstream service would send them."""
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent, f"00-{trace_id}-{parent}-01"


def _png() -> bytes:
    return image_bytes(40, 30)


def _v2_body() -> bytes:
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    request = {
        "inputs": [{"name": INPUT, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        "outputs": [{"name": "logits"}],
    }
    return json.dumps(request).encode()


def _server_span(spans: list[Span], trace_id: str) -> Span:
    [server] = [s for s in spans if s.trace_id == trace_id and s.kind == "SPAN_KIND_SERVER"]
    return server


def _children(spans: list[Span], parent: Span) -> list[Span]:
    return sorted((s for s in spans if s.parent_id == parent.span_id), key=lambda s: s.start_ns)


def _has(trace_id: str, names: list[str]) -> Any:
    def done(spans: list[Span]) -> bool:
        got = [s.name for s in spans if s.trace_id == trace_id]
        return all(got.count(n) >= 1 for n in names)

    return done


def _access_line(server: Server, path: str, trace_id: str) -> dict[str, Any]:
    lines = [json.loads(ln) for ln in server.log_text().splitlines() if ln.startswith("{")]
    [line] = [ln for ln in lines if ln.get("path") == path and ln.get("trace_id") == trace_id]
    return line


# -- the span tree of one request, over a socket ---------------------------------------------------
@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver) -> Iterator[Server]:
    """Two worker processes, each exporting on its own."""
    log = tmp_path_factory.mktemp("traced") / "server.log"
    with running_server(log, "--workers", "2", env=_env(receiver)) as server:
        yield server


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("path", "route", "content", "content_type"),
    [
        ("/classify", "/classify", _png, "image/png"),
        (V2_INFER, "/v2/models/{name}/infer", _v2_body, "application/json"),
    ],
    ids=["classify", "v2-infer"],
)
def test_the_span_tree_of_one_request(
    traced: Server, receiver: OtlpReceiver, path: str, route: str, content: Any, content_type: str
) -> None:
    trace_id, upstream, header = _traceparent()
    answer = httpx.post(
        traced.base_url + path, content=content(), headers={"content-type": content_type, "traceparent": header}
    )
    assert answer.status_code == 200, answer.text
    version = answer.json()["model_version" if path == V2_INFER else "version"]
    spans = receiver.wait(_has(trace_id, ["POST " + route, *STAGES]))

    server = _server_span(spans, trace_id)
    assert server.name == f"POST {route}" and server.parent_id == upstream  # the caller's trace goes on
    assert server.resource["service.name"] == "normserve-under-test"
    assert server.attributes["http.route"] == route
    stages = _children(spans, server)
    assert [s.name for s in stages] == STAGES
    assert all(s.trace_id == trace_id for s in stages)
    for before, after in itertools.pairwise(stages):
        assert before.end_ns <= after.start_ns, f"{before.name} ends after {after.name} starts"
    by_name = {s.name: s for s in stages}
    queue, run = by_name["queue"], by_name["run"]
    model = {MODEL: "gncnn", VERSION: version}
    assert run.attributes == {**model, BATCH_SIZE: 1, BATCH_REQUESTS: 1}
    assert run.links == [(trace_id, server.span_id)]
    assert queue.attributes == {**model, REQUEST_ROWS: 1}
    assert queue.links == [(trace_id, run.span_id)]
    assert queue.end_ns == run.start_ns

    line = _access_line(traced, path, trace_id)
    assert line["span_id"] == server.span_id and line["status"] == 200


@pytest.mark.e2e
def test_the_span_tree_of_one_grpc_infer(traced: Server, receiver: OtlpReceiver) -> None:
    """tritonclient.grpc with a `traceparent` in its metadata: the official gRPC instrumentation's
    server span continues the caller's trace, with decode, queue, run and encode under it."""
    import tritonclient.grpc as grpcclient

    trace_id, upstream, header = _traceparent()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{traced.grpc_port}")
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    image = grpcclient.InferInput(INPUT, list(x.shape), "FP32")
    image.set_data_from_numpy(x)
    result = client.infer("gncnn", [image], headers={"traceparent": header})
    assert result.as_numpy("logits").shape == (1, 10)
    rpc = "/inference.GRPCInferenceService/ModelInfer"
    grpc_stages = [s for s in STAGES if s != "read"]  # the message arrives whole: no read stage
    spans = receiver.wait(_has(trace_id, [rpc, *grpc_stages]))

    server = _server_span(spans, trace_id)
    assert server.name == rpc and server.parent_id == upstream
    stages = _children(spans, server)
    assert [s.name for s in stages] == grpc_stages
    by_name = {s.name: s for s in stages}
    assert by_name["run"].attributes[MODEL] == "gncnn" and by_name["run"].attributes[BATCH_SIZE] == 1
    assert by_name["run"].links == [(trace_id, server.span_id)]
    assert by_name["queue"].links == [(trace_id, by_name["run"].span_id)]


@pytest.mark.e2e
def test_an_untraced_path_has_no_spans_and_null_ids_in_the_access_log(traced: Server, receiver: OtlpReceiver) -> None:
    trace_id, _, header = _traceparent()
    assert httpx.get(traced.base_url + "/v2/health/live", headers={"traceparent": header}).status_code == 200
    marker, _, marker_header = _traceparent()  # a traced request after it: once it is in, so would the probe be
    httpx.post(traced.base_url + "/classify", content=_png(), headers={**PNG, "traceparent": marker_header})
    receiver.wait(_has(marker, ["POST /classify", "encode"]))
    assert receiver.trace(trace_id) == []
    lines = [json.loads(ln) for ln in traced.log_text().splitlines() if '"/v2/health/live"' in ln]
    assert lines and all(ln["trace_id"] is None and ln["span_id"] is None for ln in lines)


# -- one run span per batch --------------------------------------------------------------------------
@pytest.mark.e2e
def test_one_run_span_per_batch_linked_to_every_request_it_served(tmp_path: Path, receiver: OtlpReceiver) -> None:
    """Three requests (two /classify, one V2 infer) wait for each other (a batch of 3 rows runs when
    full, long before the 10 s delay is up) in one worker, so they share one run."""
    env = _env(receiver, NORMSERVE_MAX_BATCH_SIZE="3", NORMSERVE_MAX_QUEUE_DELAY_MS="10000")
    requests = [("/classify", _png(), "image/png"), ("/classify", _png(), "image/png")]
    requests.append((V2_INFER, _v2_body(), "application/json"))
    traces = [_traceparent() for _ in requests]

    with running_server(tmp_path / "server.log", "--workers", "1", env=env) as server:

        async def send_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
                return await asyncio.gather(
                    *(
                        client.post(path, content=body, headers={"content-type": kind, "traceparent": header})
                        for (path, body, kind), (_, _, header) in zip(requests, traces, strict=True)
                    )
                )

        answers = asyncio.run(send_all())
        assert [a.status_code for a in answers] == [200, 200, 200]
        ids = [trace_id for trace_id, _, _ in traces]
        spans = receiver.wait(lambda got: all(_has(t, ["queue", "encode"])(got) for t in ids))
        spans = [s for s in spans if s.trace_id in ids]

    servers = {t: _server_span(spans, t) for t in ids}
    [run] = [s for s in spans if s.name == "run"]
    assert run.attributes[BATCH_SIZE] == 3 and run.attributes[BATCH_REQUESTS] == 3
    assert sorted(run.links) == sorted((t, s.span_id) for t, s in servers.items())
    assert run.parent_id in {s.span_id for s in servers.values()}  # in the trace of one of them
    for server in servers.values():
        [queue] = [s for s in _children(spans, server) if s.name == "queue"]
        assert queue.links == [(run.trace_id, run.span_id)] and queue.end_ns == run.start_ns


# -- in process: sampler and off switches --------------------------------------------------------------
class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture
def access_lines() -> Iterator[list[dict[str, Any]]]:
    """The access log's records (its logger does not propagate: a handler listens to it directly)."""
    logger, handler = logging.getLogger(LOGGER_NAME), _Collect()
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def test_the_sampler_comes_from_otel_traces_sampler(
    monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver, access_lines: list[dict[str, Any]]
) -> None:
    """always_off: nothing is exported (the lifespan's end flushed the exporter), yet each request
    still has a trace id to log."""
    for key, value in _env(receiver, OTEL_TRACES_SAMPLER="always_off").items():
        monkeypatch.setenv(key, value)
    before = receiver.requests
    app = create_app(make_settings(shipped.REPOSITORY, tracing=True))
    with TestClient(app) as client:
        assert isinstance(server_state(app).tracing, Tracing)
        for _ in range(3):
            assert client.post("/classify", content=_png(), headers=PNG).status_code == 200
    assert receiver.requests == before
    lines = [ln for ln in access_lines if ln["path"] == "/classify"]
    assert len(lines) == 3 and len({ln["trace_id"] for ln in lines}) == 3
    assert all(len(ln["trace_id"]) == 32 and len(ln["span_id"]) == 16 for ln in lines)


@pytest.fixture
def traced_in_process(monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver) -> OtlpReceiver:
    """The OTEL_* environment of `_env` for apps made in this process (with tracing=True)."""
    for key, value in _env(receiver).items():
        monkeypatch.setenv(key, value)
    return receiver


def test_a_request_that_times_out_in_the_queue_has_an_error_queue_span_and_no_run(
    traced_in_process: OtlpReceiver, settings_factory: SettingsFactory
) -> None:
    receiver, (trace_id, _, header) = traced_in_process, _traceparent()
    x = np.zeros((1, 3, 32, 32), dtype=np.float32)

    async def scenario() -> None:
        settings = settings_factory(model_instances=1, request_timeout_s=0.3, tracing=True)
        async with serving(settings) as (app, client):
            b = batcher(app, f"gncnn/{shipped.GNCNN}")
            gate = ExecutorGate(app)  # the only inference thread is busy: a first request waits for it ...
            first = asyncio.create_task(b.submit({INPUT: x}))
            await until(lambda: b.dispatched == 1, "a first request occupies the batcher")
            r = await client.post(V2_INFER, json=v2_request(x), headers={"traceparent": header})  # ... this one queues
            assert r.status_code == 504
            with pytest.raises(RequestTimeout):
                await first
            gate.release()
            await until(lambda: b.dispatched == 0, "the abandoned batch is done")

    asyncio.run(scenario())  # the lifespan's end exported every span
    spans = receiver.trace(trace_id)
    server = _server_span(spans, trace_id)
    assert server.status == "STATUS_CODE_ERROR" and server.attributes["http.status_code"] == 504
    assert [s.name for s in _children(spans, server)] == ["read", "decode", "queue"]
    [queue] = [s for s in spans if s.name == "queue"]
    assert queue.status == "STATUS_CODE_ERROR" and queue.links == []


def test_a_failing_run_is_an_error_span(
    traced_in_process: OtlpReceiver, settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, (trace_id, _, header) = traced_in_process, _traceparent()

    async def scenario() -> None:
        async with serving(settings_factory(tracing=True)) as (app, client):
            model = batcher(app, f"gncnn/{shipped.GNCNN}").model

            def broken(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
                raise InferenceError("the model broke")

            monkeypatch.setattr(model, "predict", broken)
            r = await client.post("/classify", content=_png(), headers={**PNG, "traceparent": header})
            assert r.status_code == 500

    asyncio.run(scenario())
    spans = receiver.trace(trace_id)
    [run] = [s for s in spans if s.name == "run"]
    assert run.status == "STATUS_CODE_ERROR"
    assert [s.name for s in _children(spans, _server_span(spans, trace_id))] == ["read", "decode", "queue", "run"]


@pytest.mark.parametrize(
    ("tracing", "env"),
    [
        (False, {}),
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}),
        (True, {"OTEL_SDK_DISABLED": "true"}),
    ],
    ids=["default", "endpoint-alone", "sdk-disabled"],
)
def test_off_means_no_tracing_code(monkeypatch: pytest.MonkeyPatch, tracing: bool, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    app = create_app(make_settings(shipped.REPOSITORY, tracing=tracing))
    with TestClient(app) as client:
        assert server_state(app).tracing is None
        assert client.get("/v2/health/live").status_code == 200
        stack, names = app.middleware_stack, []
        while stack is not None:
            names.append(type(stack).__name__)
            stack = getattr(stack, "app", None)
    assert "AccessLogMiddleware" in names and not any("OpenTelemetry" in n for n in names)
    assert app.user_middleware[0].kwargs["trace_ids"] is None


def test_a_missing_extra_is_named_with_its_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing_module, "REQUIRED_MODULES", ("opentelemetry.sdk.trace", "no_such_otel_module"))
    with pytest.raises(tracing_module.TracingUnavailable, match=r"no_such_otel_module.*pip install"):
        create_app(make_settings(shipped.REPOSITORY, tracing=True))


def test_serve_without_the_extra_names_its_install_command(tmp_path: Path) -> None:
    """`normserve serve` with tracing on where the OpenTelemetry SDK cannot be imported (a bare
    `opentelemetry` package earlier on the path hides the installed one): a message, no traceback."""
    (tmp_path / "opentelemetry").mkdir()
    (tmp_path / "opentelemetry" / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NORMSERVE_", "OTEL_"))}
    env |= {"NORMSERVE_TRACING": "true", "PYTHONPATH": str(tmp_path)}
    serve = [sys.executable, "-m", "normserve.cli", "serve", "--port", "1"]
    done = subprocess.run(serve, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "tracing extra is not installed (opentelemetry.sdk is missing)" in done.stderr
    assert "pip install" in done.stderr and "Traceback" not in done.stderr


# -- gRPC: the interceptor the gRPC server installs ------------------------------------------------------
def test_grpc_server_interceptor_continues_the_callers_trace() -> None:
    """A grpc.aio server built with `grpc_server_interceptors()`: the RPC's SERVER span continues
    the `traceparent` in the call's metadata, and a stage inside the handler is its child."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    tracing = Tracing()
    exported = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(exported))
    trace_id, upstream, header = _traceparent()

    async def echo(request: bytes, context: Any) -> bytes:
        with tracing_module.span(tracing, "decode"):
            return request[::-1]

    async def call() -> bytes:
        server = grpc.aio.server(interceptors=tracing.grpc_server_interceptors())
        handler = grpc.unary_unary_rpc_method_handler(echo)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {"Call": handler})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = channel.unary_unary("/test.Echo/Call")
                answer: bytes = await stub(b"abc", metadata=(("traceparent", header),), timeout=10)
                return answer
        finally:
            await server.stop(None)

    assert asyncio.run(call()) == b"cba"
    tracing.shutdown()
    spans = {s.name: s for s in exported.get_finished_spans()}
    rpc, decode = spans["/test.Echo/Call"], spans["decode"]
    assert rpc.kind.name == "SERVER" and f"{rpc.context.trace_id:032x}" == trace_id
    assert rpc.parent is not None and f"{rpc.parent.span_id:016x}" == upstream
    assert decode.parent is not None and decode.parent.span_id == rpc.context.span_id
