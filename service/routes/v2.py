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

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from normserve.service import v2_protocol
from normserve.service.deps import RepositoryDep, SettingsDep, run_inference
from normserve.service.errors import error_responses
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
from normserve.service.shutdown import Drain
from normserve.service.tracing import stage
from normserve.service.v2_config import TritonModelConfig, model_config
from normserve.service.workers import WorkerRoster

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
    drain: Drain = request.app.state.drain
    return drain.draining


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


@router.get("/health/ready", response_model=ServerReady, responses={503: {"model": ServerReady}})
async def ready(request: Request, repo: RepositoryDep, settings: SettingsDep) -> JSONResponse:
    """Every model is ready (or, with strict readiness off, at least one), every worker process is
    up, and the server is not shutting down."""
    draining = _draining(request)
    roster: WorkerRoster = request.app.state.workers
    workers_ready = roster.ready_count()
    reason = SHUTTING_DOWN if draining else ""
    if not reason and workers_ready < settings.workers:
        reason = f"{workers_ready} of {settings.workers} worker processes are ready"
    body = ServerReady(
        ready=repo.ready() and not reason,
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


def _metadata(repo: ModelRepository, name: str, version: str | None) -> ModelMetadata:
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
    )


@router.get("/models/{name}", response_model=ModelMetadata, responses=error_responses(404, 422, 503))
async def model_metadata(name: str, repo: RepositoryDep) -> ModelMetadata:
    return _metadata(repo, name, None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=error_responses(404, 422, 503))
async def model_version_metadata(name: str, version: str, repo: RepositoryDep) -> ModelMetadata:
    return _metadata(repo, name, version)


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
    rows = [
        _ready(model)
        if model is not None
        else ModelReady(name=name, version=version, ready=False, state="UNAVAILABLE", reason=reason)
        for name, version, model, reason in repo.index()
    ]
    return [r for r in rows if r.ready] if body is not None and body.ready else rows


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


async def _infer(request: Request, repo: RepositoryDep, name: str, version: str | None) -> Response:
    model = repo.get(name, version)
    config = model.require_config()
    # The body is read raw whatever its Content-Type (clients differ in what they send).
    with stage(request, "read"):
        body = await request.body()
    with stage(request, "decode"):
        parsed, binary = v2_protocol.parse_request(body, request.headers.get(v2_protocol.HEADER_LENGTH))
        inputs = v2_protocol.decode_inputs(parsed, binary, config)
        outputs = v2_protocol.requested_outputs(parsed, config)
    results = await run_inference(request, model, inputs, [o.name for o in outputs])
    with stage(request, "encode"):
        payload, headers = v2_protocol.encode_response(
            model.name, model.version, parsed, outputs, results, config.labels
        )
    return Response(payload, headers=headers)


@infer_router.post("/models/{name}/infer", openapi_extra=_INFER_OPENAPI)
async def infer(name: str, request: Request, repo: RepositoryDep) -> Response:
    """Open Inference Protocol v2 inference (JSON or binary tensors) on the newest version."""
    return await _infer(request, repo, name, None)


@infer_router.post("/models/{name}/versions/{version}/infer", openapi_extra=_INFER_OPENAPI)
async def infer_version(name: str, version: str, request: Request, repo: RepositoryDep) -> Response:
    """Open Inference Protocol v2 inference on one version."""
    return await _infer(request, repo, name, version)
