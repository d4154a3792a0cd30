"""The gRPC endpoint: Triton's `inference.GRPCInferenceService` (Open Inference Protocol v2 over
gRPC) on `grpc.aio`, so the unmodified `tritonclient.grpc` (sync and aio) works against normserve.

Served RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer
(raw_input_contents or typed contents in; raw_output_contents out, as Triton answers),
ModelConfig and RepositoryIndex; the others answer UNIMPLEMENTED. Server reflection
(grpc.reflection.v1alpha) lists the service, so `grpcurl` works without the .proto files.

Messages come from Triton's own .proto files (service/protos, BSD-3), compiled by protoc into a
descriptor set (`inference.binpb`, regenerated and compared by tests/service/test_grpc_proto.py)
and loaded into a descriptor pool of our own: no hand-written protobuf code, and no clash with
the same `inference.*` messages that tritonclient registers in protobuf's default pool when both
live in one process.

Everything behind the wire is HTTP's: the lifespan (app.py) starts one server per worker
process on NORMSERVE_GRPC_PORT (SO_REUSEPORT: the workers share the port, the kernel spreads
connections), and it reads the server's state (state.py): the same repository, limits, API key
(`authorization: Bearer <key>` metadata, on ModelInfer and RepositoryIndex as on HTTP's routes),
metrics and JSON access log. ModelInfer runs through v2_infer.infer, as HTTP's infer does.

Errors map to status codes as Triton's do: bad input INVALID_ARGUMENT, unknown model NOT_FOUND,
model not ready, draining or queue full UNAVAILABLE (with a `retry-after` trailer for a full
queue), an image over the pixel limit RESOURCE_EXHAUSTED (as gRPC answers a message over its size
limit), NORMSERVE_REQUEST_TIMEOUT_S or the client's deadline DEADLINE_EXCEEDED, a missing or
wrong key UNAUTHENTICATED, a call past NORMSERVE_GRPC_MAX_CONCURRENT_RPCS RESOURCE_EXHAUSTED (from
gRPC itself, before the message is received: messages are received whole before a handler could
reserve them from the memory budget). A request whose deadline passes while it is queued is taken off the
queue and never runs (the batcher drops a cancelled request).

Shutdown: when the server starts draining (SIGTERM; shutdown.py) the gRPC server stops taking
new calls at once and lets the calls in flight finish within NORMSERVE_SHUTDOWN_GRACE_S; the
lifespan waits for that before it stops the batchers. ServerReady answers false while draining.

`GrpcServer(..., interceptors=[...])` takes grpc.aio server interceptors (OpenTelemetry's
`aio_server_interceptor()`, say); the server itself is `GrpcServer.server`.
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection

from normserve import __version__
from normserve.service import v2_infer, v2_protocol
from normserve.service.access_log import log_request, request_id_from
from normserve.service.budget import Held
from normserve.service.errors import (
    InvalidInput,
    ModelNotFound,
    NormserveError,
    Overloaded,
    Unauthorized,
)
from normserve.service.metrics import Metrics
from normserve.service.repository import ModelRepository
from normserve.service.routes import v2 as v2_routes
from normserve.service.shutdown import Drain
from normserve.service.state import ServerState
from normserve.service.tracing import span as tracing_span
from normserve.service.v2_config import model_config

log = logging.getLogger("normserve.grpc")

PROTO_DIR = Path(__file__).parent / "protos"
DESCRIPTOR_SET = PROTO_DIR / "inference.binpb"
PROTO_FILES = ("grpc_service.proto", "model_config.proto")
SERVICE = "inference.GRPCInferenceService"


def _pool() -> descriptor_pool.DescriptorPool:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    return pool


POOL = _pool()


@cache
def message_class(name: str) -> type[Message]:
    """The message class of `inference.<name>` (a nested one as `Outer.Inner`)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{name}"))


# V2 datatype -> the InferTensorContents field that carries it typed (FP16 travels raw only)
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# Our errors' HTTP status -> gRPC status (Triton's mapping: queue full is UNAVAILABLE)
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    406: grpc.StatusCode.INVALID_ARGUMENT,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# ... and back, for the `status` label of the metrics and the access log (shared with HTTP, so
# alerts on 5xx see both); CANCELLED: the client went away (nginx's 499).
HTTP_STATUS = {code: status for status, code in STATUS_CODES.items() if status not in (406, 415, 422)}
HTTP_STATUS |= {grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNIMPLEMENTED: 501}


class DeadlineExceeded(NormserveError):
    """The client's gRPC deadline passed before the inference finished."""

    status_code = 504


def status_code(exc: NormserveError) -> grpc.StatusCode:
    return STATUS_CODES.get(exc.status_code, grpc.StatusCode.UNKNOWN)


def _parameters(params: Any) -> dict[str, Any]:
    """A `map<string, InferParameter>` as plain values."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def input_tensors(request: Any) -> list[v2_protocol.InputTensor]:
    """A ModelInferRequest's inputs: from raw_input_contents (one entry per input, in order) or
    each input's typed contents, never both."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    tensors = []
    for i, inp in enumerate(request.inputs):
        tensor = v2_protocol.InputTensor(inp.name, inp.datatype, list(inp.shape))
        if raw:
            if inp.HasField("contents"):
                raise InvalidInput(f"input '{inp.name}' has typed contents and raw_input_contents; send one")
            tensor.raw = raw[i]
        else:
            field = CONTENTS_FIELD.get(inp.datatype)
            if field == "bytes_contents":
                tensor.elements = list(inp.contents.bytes_contents)
            elif field is not None:
                tensor.values = list(getattr(inp.contents, field))
            elif inp.datatype in v2_protocol.DTYPES:
                raise InvalidInput(f"input '{inp.name}': {inp.datatype} has no typed contents; send raw_input_contents")
            else:
                tensor.values = []  # an unknown datatype: decode_inputs names the mismatch
        tensors.append(tensor)
    return tensors


def requested_outputs(request: Any) -> list[v2_protocol.RequestOutput]:
    return [v2_protocol.RequestOutput(name=o.name, parameters=_parameters(o.parameters)) for o in request.outputs]


Handler = Callable[[Any, grpc.aio.ServicerContext, SimpleNamespace], Awaitable[Message | bytes]]


def _serializer(response_class: type[Message]) -> Callable[[Message | bytes], bytes]:
    """The response's serialiser; a handler may answer bytes it serialised itself (off the loop)."""
    serialize = response_class.SerializeToString

    def serializer(response: Message | bytes) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serializer


class GrpcServer:
    """One worker's gRPC server over the server's state (app.py's lifespan builds both)."""

    def __init__(self, server: ServerState, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> None:
        self.state = server
        settings = self.settings = server.settings
        self.metrics: Metrics = server.metrics
        self.drain: Drain = server.drain
        host = f"[{settings.host}]" if ":" in settings.host else settings.host  # an IPv6 address, bracketed
        self.address = f"{host}:{settings.grpc_port}"
        self.port = 0
        self.server = grpc.aio.server(
            interceptors=list(interceptors),
            maximum_concurrent_rpcs=settings.grpc_concurrent_rpcs(),
            options=[
                ("grpc.max_receive_message_length", settings.grpc_receive_limit()),
                ("grpc.max_send_message_length", settings.grpc_max_send_bytes),
                ("grpc.so_reuseport", 1),  # every worker binds the port (gRPC's Linux default, made explicit)
            ],
        )
        self._stopping: asyncio.Task[None] | None = None
        self._releasing: set[asyncio.Task[None]] = set()  # reservations waiting for a thread step
        self._loop: asyncio.AbstractEventLoop | None = None
        self.server.add_generic_rpc_handlers((self._handlers(),))
        reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), self.server, pool=POOL)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            self.port = self.server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise RuntimeError(
                f"cannot listen for gRPC on {self.address}: {exc} (NORMSERVE_GRPC_PORT; NORMSERVE_GRPC=false turns it off)"
            ) from None
        await self.server.start()
        self._loop = asyncio.get_running_loop()
        self.drain.on_start(self._drain_started)
        log.info(
            "gRPC (inference.GRPCInferenceService) listening on %s", self.address.rsplit(":", 1)[0] + f":{self.port}"
        )

    def _drain_started(self) -> None:
        # From the signal handler: only schedule the stop on the loop.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._begin_stop)

    def _begin_stop(self) -> None:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.server.stop(self.settings.shutdown_grace_s))

    async def stop(self) -> None:
        """Take no new calls; let those in flight finish (within the shutdown grace period)."""
        self._begin_stop()
        assert self._stopping is not None
        await self._stopping

    # -- plumbing ----------------------------------------------------------------------------
    def _handlers(self) -> grpc.GenericRpcHandler:
        service = POOL.FindServiceByName(SERVICE)
        implemented: dict[str, tuple[Handler, bool]] = {
            "ServerLive": (self.server_live, False),
            "ServerReady": (self.server_ready, False),
            "ModelReady": (self.model_ready, False),
            "ServerMetadata": (self.server_metadata, False),
            "ModelMetadata": (self.model_metadata, False),
            "ModelConfig": (self.model_config, False),
            "ModelInfer": (self.model_infer, True),  # runs a model: the API key, as HTTP's infer
            "RepositoryIndex": (self.repository_index, True),  # as HTTP's POST /v2/repository/index
        }
        handlers = {}
        for method in service.methods:
            if method.name not in implemented:
                continue
            handler, needs_key = implemented[method.name]
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                self._wrap(f"/{SERVICE}/{method.name}", handler, needs_key, response_class),
                request_deserializer=request_class.FromString,
                response_serializer=_serializer(response_class),
            )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _wrap(
        self, route: str, handler: Handler, needs_key: bool, response_class: type[Message]
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message | bytes]]:
        """The metrics, access log, API key and error mapping around one RPC."""

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Message | bytes:
            started = time.perf_counter()
            metadata = context.invocation_metadata() or ()
            request_id = request_id_from([(k.encode(), v.encode()) for k, v in metadata if isinstance(v, str)])
            trailers: list[tuple[str, str]] = [("x-request-id", request_id)]
            state = SimpleNamespace(model=None, model_version=None, batch_size=None)
            code, error = grpc.StatusCode.OK, None
            self.metrics.in_flight.inc()
            drain = self.drain  # calls count as activity, as HTTP requests do: the memory trimmer waits for quiet
            drain.in_flight += 1
            drain.last_activity = time.monotonic()
            try:
                if needs_key:
                    self._authorize(metadata)
                response = await handler(request, context, state)
                context.set_trailing_metadata(trailers)
                return response
            except NormserveError as exc:
                code, error = status_code(exc), type(exc).__name__
                if exc.status_code >= 500:
                    log.error("%s: %s", error, exc.message)
                if isinstance(exc, Overloaded) and exc.headers:
                    trailers.append(("retry-after", exc.headers["Retry-After"]))
                await context.abort(code, exc.message, trailing_metadata=tuple(trailers))
            except asyncio.CancelledError:  # the client cancelled or went away
                code, error = grpc.StatusCode.CANCELLED, "Cancelled"
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                log.exception("unhandled error in %s", route, exc_info=exc)
                code, error = grpc.StatusCode.INTERNAL, type(exc).__name__
                await context.abort(code, f"internal error ({error})", trailing_metadata=tuple(trailers))
            finally:
                self.metrics.in_flight.dec()
                drain.in_flight -= 1
                drain.last_activity = time.monotonic()
                self._record(route, code, error, started, request_id, state, context)
            return response_class()  # not reached: abort raises

        return call

    def _authorize(self, metadata: Sequence[tuple[str, Any]]) -> None:
        """`authorization: Bearer <key>` metadata, when NORMSERVE_API_KEY is set (as HTTP's header)."""
        key = self.settings.api_key
        if key is None:
            return
        values = [v for k, v in metadata if k == "authorization" and isinstance(v, str)]
        if not values:
            raise Unauthorized("this call needs an API key: send the metadata 'authorization: Bearer <key>'")
        scheme, _, credentials = values[0].partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credentials.strip().encode(), key.get_secret_value().encode()
        ):
            raise Unauthorized("wrong API key", invalid_token=True)

    def _record(
        self,
        route: str,
        code: grpc.StatusCode,
        error: str | None,
        started: float,
        request_id: str,
        state: SimpleNamespace,
        context: grpc.aio.ServicerContext,
    ) -> None:
        elapsed = time.perf_counter() - started
        status = HTTP_STATUS.get(code, 500)
        model = state.model or ""
        self.metrics.requests.labels(route, model, str(status)).inc()
        self.metrics.request_seconds.labels(route).observe(elapsed)
        if status >= 400:
            self.metrics.failures.labels(route, error or code.name).inc()
        if self.settings.access_log:
            peer = unquote(context.peer() or "")  # "ipv4:127.0.0.1:5555", "ipv6:%5B::1%5D:5555"
            client = peer.split(":", 1)[-1].rsplit(":", 1)[0].strip("[]") or None
            log_request(
                request_id=request_id,
                method="GRPC",
                path=route,
                route=route,
                status=status,
                latency_ms=elapsed * 1000,
                state=vars(state),
                client=client,
                error=error,
                grpc_status=code.name,
            )

    @property
    def repository(self) -> ModelRepository:
        return self.state.repository

    # -- the RPCs ----------------------------------------------------------------------------
    async def server_live(self, request: Any, context: Any, state: SimpleNamespace) -> Message:
        return message_class("ServerLiveResponse")(live=True)

    async def server_ready(self, request: Any, context: Any, state: SimpleNamespace) -> Message:
        ready, _, _ = v2_routes.server_readiness(self.state)
        return message_class("ServerReadyResponse")(ready=ready)

    async def model_ready(self, request: Any, context: Any, state: SimpleNamespace) -> Message:
        try:
            model = self.repository.find(request.name, request.version or None)
        except ModelNotFound:
            ready = False  # as Triton: an unknown model is not ready (HTTP answers 404)
        else:
            ready = model.ready and not self.drain.draining
        return message_class("ModelReadyResponse")(ready=ready)

    async def server_metadata(self, request: Any, context: Any, state: SimpleNamespace) -> Message:
        return message_class("ServerMetadataResponse")(
            name="normserve", version=__version__, extensions=v2_protocol.EXTENSIONS
        )

    async def model_metadata(self, request: Any, context: Any, state: SimpleNamespace) -> Message:
        meta = v2_routes.metadata(self.repository, request.name, request.version or None)
        response = message_class("ModelMetadataResponse")(
            name=meta.name, versions=meta.versions, platform=meta.platform
        )
        for tensors, target in ((meta.inputs, response.inputs), (meta.outputs, response.outputs)):
            for t in tensors:
                target.add(name=t.name, datatype=t.datatype, shape=t.shape)
        return response

    async def model_config(self, request: Any, context: Any, state: SimpleNamespace) -> Message:
        config = model_config(self.repository.get(request.name, request.version or None), self.settings)
        response = message_class("ModelConfigResponse")()
        json_format.ParseDict(config.model_dump(exclude_none=True), response.config)  # Triton's JSON = its proto's
        return response

    async def repository_index(self, request: Any, context: Any, state: SimpleNamespace) -> Message:
        response = message_class("RepositoryIndexResponse")()
        for row in v2_routes.index_rows(self.repository, request.ready):
            response.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
        return response

    async def model_infer(self, request: Any, context: Any, state: SimpleNamespace) -> Message | bytes:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the call's deadline had passed when it arrived; nothing was run")
        model = self.repository.get(request.model_name, request.model_version or None)
        tracing = self.state.tracing
        held = Held(self.state.budget)
        try:
            async with asyncio.timeout(remaining):
                # the worker's memory budget, as HTTP's infer: the estimate from the declared shapes
                # (413 → RESOURCE_EXHAUSTED past NORMSERVE_MAX_BATCH_PIXELS or the whole budget;
                # no room within NORMSERVE_MEMORY_WAIT_S → UNAVAILABLE with retry-after), reserved
                # before the typed contents become Python lists and arrays
                requested = requested_outputs(request) or None
                outputs = v2_protocol.requested_outputs(requested, model.require_config())
                need = v2_infer.run_budget(model, request.inputs, outputs, binary_output=True)
                await held.reserve(message_bytes(request) + need, model.key)
                large = held.bytes > INLINE_MESSAGE_BYTES
                with tracing_span(tracing, "decode"):  # typed contents become lists: a large one in a thread
                    tensors = await held.in_thread(input_tensors, request) if large else input_tensors(request)
                results = await v2_infer.infer(self.state, state, model, tensors, requested, held=held)
                with tracing_span(tracing, "encode"):  # a large answer is copied and serialised in a thread
                    encode = (model.name, model.version, request.id, results)
                    return await held.in_thread(infer_response, *encode) if large else infer_response(*encode)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the call's deadline ({remaining:.3g} s) passed before the inference finished; "
                "a request still queued then is dropped without running"
            ) from None
        finally:
            self._release(held)

    def _release(self, held: Held) -> None:
        """Give the call's reservation back; when the call ended while a thread step of it still
        runs (deadline, client gone), once that step has returned."""
        if not held.busy:
            held.release()
            return
        task = asyncio.get_running_loop().create_task(held.close())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)


# A call whose reservation (message and run) is larger than this converts its inputs and
# serialises its answer in a thread: copying tens of MB holds the GIL, and with it the event loop
# that answers every other call and request of the worker.
INLINE_MESSAGE_BYTES = 4 * 1024 * 1024


def infer_response(name: str, version: str, request_id: str, outputs: list[v2_protocol.OutputTensor]) -> bytes:
    """A ModelInferResponse, serialised (raw_output_contents, as Triton answers). The outputs'
    bytes are not put into the message: protobuf would copy them twice (into the message, then
    into its serialisation), each copy one C call that holds the GIL, and with it the event loop
    (100 ms for the classifier's feature maps at 384²). The rest of the message is serialised by
    protobuf and the raw contents (its last field, so the bytes are those protobuf would write)
    are appended after it, copied once by `released_join`."""
    response = message_class("ModelInferResponse")(model_name=name, model_version=version, id=request_id)
    parts: list[bytes | np.ndarray] = []
    for out in outputs:
        response.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.value.shape))
        raw = out.wire()
        parts += [RAW_OUTPUT_TAG + _varint(len(raw) if isinstance(raw, bytes) else raw.nbytes), raw]
    return released_join([response.SerializeToString(), *parts])


# ModelInferResponse.raw_output_contents: field 6, length-delimited (wire type 2)
RAW_OUTPUT_TAG = bytes([6 << 3 | 2])


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a length."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize  # a bytes object, its contents not yet set
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_BYTES_DATA = bytes.__basicsize__ - 1  # where a CPython bytes object's contents start, from its address


def released_join(parts: Sequence[bytes | np.ndarray]) -> bytes:
    """The parts joined into one bytes object, copied with the GIL released (ctypes releases it
    for a foreign call such as memmove), as CPython's own C code fills a new bytes object: the
    object is not seen by anyone until it is full. Elsewhere than CPython, a plain join."""
    if sys.implementation.name != "cpython":
        return b"".join(p if isinstance(p, bytes) else p.tobytes() for p in parts)
    out = _new_bytes(None, sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts))
    at = id(out) + _BYTES_DATA
    for p in parts:
        if isinstance(p, bytes):
            ctypes.memmove(at, p, len(p))
            at += len(p)
        else:
            ctypes.memmove(at, p.ctypes.data, p.nbytes)
            at += p.nbytes
    return out  # type: ignore[no-any-return]


# What a Python value of a typed-contents list costs once `input_tensors` has listed it: a float
# object (24 bytes) and its pointer; the protobuf field keeps its own 4-8 bytes a value meanwhile.
TYPED_VALUE_BYTES = 40


def message_bytes(request: Any) -> int:
    """Memory a ModelInferRequest holds before it is run: its raw tensors, or its typed contents
    with the Python lists `input_tensors` makes of them (counted, not listed)."""
    if request.raw_input_contents:
        return sum(len(raw) for raw in request.raw_input_contents)
    total = 0
    for inp in request.inputs:
        field = CONTENTS_FIELD.get(inp.datatype)
        if field == "bytes_contents":
            total += sum(len(b) + 64 for b in inp.contents.bytes_contents)
        elif field is not None:
            total += TYPED_VALUE_BYTES * len(getattr(inp.contents, field))
    return total
