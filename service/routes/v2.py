"""Open Inference Protocol v2: server and model health and metadata.

Ready endpoints answer 200 when ready and 503 when not (with the reason), so they work as
Kubernetes probes as they are; they answer 503 too once the server is shutting down.

`router` holds the open routes (health, metadata); `infer_router` the POST ones, which run a
model or read the repository (Triton's restricted model-repository API), and which the app
mounts behind the API key. A new route that runs a model belongs on the latter.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from typing import Any, cast

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from normserve.service import v2_infer, v2_protocol
from normserve.service.budget import v2_parse_bytes
from normserve.service.deps import RepositoryDep, SettingsDep
from normserve.service.errors import PayloadTooLarge, error_responses
from normserve.service.governor import held, request_deadline, reserve
from normserve.service.large_bodies import PartsResponse
from normserve.service.model import ServedModel
from normserve.service.repository import ModelRepository
from normserve.service.schemas import (
    ModelMetadata,
    ModelReady,
    RepositoryIndexRequest,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
)
from normserve.service.security import check_api_key
from normserve.service.state import ServerState, request_state
from normserve.service.tracing import stage
from normserve.service.v2_config import TritonModelConfig, model_config

router = APIRouter(prefix="/v2", tags=["v2"])
infer_router = APIRouter(prefix="/v2", tags=["v2"], responses=error_responses(400, 404, 413, 422, 500, 503, 504))

EXTENSIONS: list[str] = v2_protocol.EXTENSIONS


def _server_version() -> str:
    try:
        return pkg_version("normserve")
    except PackageNotFoundError:
        return "0+unknown"


SHUTTING_DOWN = "server is shutting down"


def _draining(request: Request) -> bool:
    return request_state(request).drain.draining


def _ready(model: ServedModel) -> ModelReady:
    return ModelReady(
        name=model.name, version=model.version, ready=model.ready, state=model.state.value, reason=model.reason
    )


def _ready_response(model: ServedModel, draining: bool) -> JSONResponse:
    body = _ready(model)
    if draining:
        body.ready, body.reason = False, SHUTTING_DOWN
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="normserve", version=_server_version(), extensions=EXTENSIONS)


@router.get("/health/live")
async def live() -> dict[str, bool]:
    """The process is up and answering."""
    return {"live": True}


def server_readiness(server: ServerState) -> tuple[bool, str, int]:
    """(ready, reason, worker processes ready): what HTTP's and gRPC's ServerReady both answer."""
    settings, repo = server.settings, server.repository
    workers_ready = server.workers.ready_count()
    reason = SHUTTING_DOWN if server.drain.draining else ""
    if not reason and workers_ready < settings.workers:
        reason = f"{workers_ready} of {settings.workers} worker processes are ready"
    return repo.ready() and not reason, reason, workers_ready


@router.get("/health/ready", response_model=ServerReady, responses={503: {"model": ServerReady}})
async def ready(request: Request, repo: RepositoryDep, settings: SettingsDep) -> JSONResponse:
    """Every model is ready (or, with strict readiness off, at least one), every worker process is
    up (its gRPC server listening too, unless NORMSERVE_GRPC is off), and the server is not
    shutting down."""
    is_ready, reason, workers_ready = server_readiness(request_state(request))
    body = ServerReady(
        ready=is_ready,
        models=[_ready(m) for m in repo.all()],
        reason=reason,
        workers=settings.workers,
        workers_ready=workers_ready,
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get(
    "/models/{name}/ready",
    response_model=ModelReady,
    responses={503: {"model": ModelReady}, **error_responses(404, 422)},
)
async def model_ready(name: str, request: Request, repo: RepositoryDep) -> JSONResponse:
    return _ready_response(repo.find(name), _draining(request))


@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=ModelReady,
    responses={503: {"model": ModelReady}, **error_responses(404, 422)},
)
async def model_version_ready(name: str, version: str, request: Request, repo: RepositoryDep) -> JSONResponse:
    return _ready_response(repo.find(name, version), _draining(request))


def metadata(repo: ModelRepository, name: str, version: str | None) -> ModelMetadata:
    model = repo.get(name, version)
    config = model.require_config()
    return ModelMetadata(
        name=model.name,
        versions=[v for v, m in repo.models[name].items() if m.ready],
        platform=config.platform,
        inputs=[TensorMetadata(**t.model_dump()) for t in config.inputs],
        outputs=[TensorMetadata(**t.model_dump()) for t in config.outputs],
        task=config.task,
        trained=config.weights.trained,
        execution_provider=model.provider,
        labels=config.labels,
        encoded_image_inputs=v2_protocol.encoded_image_inputs(config),
    )


@router.get("/models/{name}", response_model=ModelMetadata, responses=error_responses(404, 422, 503))
async def model_metadata(name: str, repo: RepositoryDep) -> ModelMetadata:
    return metadata(repo, name, None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=error_responses(404, 422, 503))
async def model_version_metadata(name: str, version: str, repo: RepositoryDep) -> ModelMetadata:
    return metadata(repo, name, version)


@router.get(
    "/models/{name}/config",
    response_model=TritonModelConfig,
    response_model_exclude_none=True,
    responses=error_responses(404, 422, 503),
)
async def model_config_endpoint(name: str, repo: RepositoryDep, settings: SettingsDep) -> TritonModelConfig:
    """The model configuration in Triton's JSON shape (what `get_model_config` and perf_analyzer read)."""
    return model_config(repo.get(name), settings)


@router.get(
    "/models/{name}/versions/{version}/config",
    response_model=TritonModelConfig,
    response_model_exclude_none=True,
    responses=error_responses(404, 422, 503),
)
async def model_version_config(
    name: str, version: str, repo: RepositoryDep, settings: SettingsDep
) -> TritonModelConfig:
    return model_config(repo.get(name, version), settings)


@router.get("/models", response_model=list[ModelReady])
async def list_models(repo: RepositoryDep) -> list[ModelReady]:
    """Every model version the server loaded (NORMSERVE_VERSION_POLICY), with its state."""
    return [_ready(m) for m in repo.all()]


@infer_router.post("/repository/index", response_model=list[ModelReady], responses=error_responses(400, 422))
async def repository_index(repo: RepositoryDep, body: RepositoryIndexRequest | None = None) -> list[ModelReady]:
    """Triton's repository index: every version in the model repository, loaded or not. A version
    that is not loaded is UNAVAILABLE, with the reason (the version policy left it out, or it
    failed to load while the repository was polled). `{"ready": true}` lists only the ready ones;
    the body may be empty (tritonclient sends none)."""
    return index_rows(repo, body is not None and body.ready)


def index_rows(repo: ModelRepository, ready_only: bool) -> list[ModelReady]:
    rows = [
        _ready(model)
        if model is not None
        else ModelReady(name=name, version=version, ready=False, state="UNAVAILABLE", reason=reason)
        for name, version, model, reason in repo.index()
    ]
    return [r for r in rows if r.ready] if ready_only else rows


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` inlined: inside an OpenAPI document `#/$defs/...`
    would resolve against the document's root, where nothing is (the models are not recursive)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return cast(dict[str, Any], resolve(schema))


_INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inlined(v2_protocol.InferRequest.model_json_schema())},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# A request whose JSON part is at most this large is parsed on the event loop (a thread trip costs
# more than parsing it); a larger one, up to NORMSERVE_MAX_JSON_BYTES, in a thread, one at a time
# per worker process, and its lists of numbers become arrays there too (`json_arrays`, a slice at a
# time). Large answers are encoded through the same one thread (`json_limiter`): each of these
# steps holds the GIL in turns with the event loop, and more of them at once would make the loop
# wait behind several. The thread does not free the loop during orjson.loads itself, one C call that holds the
# GIL (~6 ms a MiB; a 16 MiB body stalled /v2/health/live 150 ms on the loop and in a thread
# alike), which is why the JSON part has a limit of its own, well under the body limit that binary
# tensors get.
INLINE_JSON_BYTES = 64 * 1024
JSON_PARSE_THREADS = 1


async def _infer(request: Request, repo: RepositoryDep, name: str, version: str | None) -> Response:
    model = repo.get(name, version)
    # The body is read raw whatever its Content-Type (clients differ in what they send).
    with stage(request, "read"):
        body = await request.body()
    header = request.headers.get(v2_protocol.HEADER_LENGTH)
    server = request_state(request)
    size, limit = v2_protocol.json_size(body, header), server.settings.max_json_bytes
    if size > limit:  # parsing holds the GIL throughout: ~6 ms a MiB in which nothing else runs
        raise PayloadTooLarge(
            f"the JSON part of this request is {size} bytes; the limit is {limit} (NORMSERVE_MAX_JSON_BYTES): "
            "send large tensors as binary data (Inference-Header-Content-Length, Triton's binary extension)"
        )
    parse = v2_parse_bytes(len(body), size)
    if size > V2_PARSE_UNRESERVED:  # a large JSON part: reserve its Python objects before parsing it
        await reserve(request, parse, f"a V2 request of {len(body)} bytes")
    else:  # a binary request or a small JSON one: one reservation, after the shapes are known
        parse = 0
    with stage(request, "decode"):
        if size <= INLINE_JSON_BYTES:
            parsed, binary = v2_protocol.parse_request(body, header)
        else:  # in a thread, one at a time: the loop runs before and after it, never two parses back to back
            parsed, binary = await anyio.to_thread.run_sync(
                v2_protocol.parse_request, body, header, limiter=server.json_limiter
            )
    requested = v2_protocol.requested_outputs(parsed.outputs, model.require_config())
    # the pixel and memory budgets of the image routes, from the declared shapes, before any array
    binary_out = bool(parsed.parameters.get("binary_data_output", False)) or all(
        o.parameters.get("binary_data", False) for o in requested
    )
    need = v2_infer.run_budget(model, parsed.inputs, requested, binary_out)
    await reserve(request, max(0, len(body) + need - parse), model.key)
    tensors = v2_protocol.http_tensors(parsed, binary)
    if size > INLINE_JSON_BYTES:  # its lists of numbers become arrays off the loop too, a slice at a time
        with stage(request, "decode"):
            await anyio.to_thread.run_sync(v2_protocol.json_arrays, tensors, limiter=server.json_limiter)
    outputs = await v2_infer.infer(
        server,
        request.state,
        model,
        tensors,
        parsed.outputs,
        deadline=request_deadline(request),
        held=held(request),
    )
    with stage(request, "encode"):
        args = (model.name, model.version, parsed, outputs)
        if v2_protocol.large_answer(outputs):  # in a thread, a chunk at a time, one at a time as the parse
            parts, headers = await anyio.to_thread.run_sync(
                v2_protocol.encode_response, *args, limiter=server.json_limiter
            )
        else:
            parts, headers = v2_protocol.encode_response(*args)
    return PartsResponse(parts, headers=headers)


V2_PARSE_UNRESERVED = 1024 * 1024  # a JSON part this small (~10 MiB parsed) is not reserved on its own


# With NORMSERVE_RAW_ROUTES on (the default) `infer_raw` answers both below FastAPI's routing
# (service/raw_routes.py); these routes document them and answer when the setting is off.
@infer_router.post("/models/{name}/infer", openapi_extra=_INFER_OPENAPI)
async def infer(name: str, request: Request, repo: RepositoryDep) -> Response:
    """Open Inference Protocol v2 inference (JSON or binary tensors) on the newest version."""
    return await _infer(request, repo, name, None)


@infer_router.post("/models/{name}/versions/{version}/infer", openapi_extra=_INFER_OPENAPI)
async def infer_version(name: str, version: str, request: Request, repo: RepositoryDep) -> Response:
    """Open Inference Protocol v2 inference on one version."""
    return await _infer(request, repo, name, version)


async def infer_raw(request: Request) -> Response:
    """Both infer routes for `RawRoutes`: the API key, then what the FastAPI routes do, without
    their dependency solving."""
    await check_api_key(request)
    params = request.path_params
    return await _infer(request, request_state(request).repository, params["name"], params.get("version"))


RAW_ROUTES = {"/v2/models/{name}/infer": infer_raw, "/v2/models/{name}/versions/{version}/infer": infer_raw}
