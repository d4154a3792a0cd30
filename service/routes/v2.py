"""Open Inference Protocol v2: server and model health and metadata.

Ready endpoints answer 200 when ready and 503 when not (with the reason), so they work as
Kubernetes probes as they are.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import RepositoryDep
from service.model import ServedModel
from service.repository import ModelRepository
from service.schemas import ModelMetadata, ModelReady, ServerMetadata, ServerReady, TensorMetadata

router = APIRouter(prefix="/v2", tags=["v2"])

EXTENSIONS: list[str] = []


def _server_version() -> str:
    try:
        return pkg_version("normserve")
    except PackageNotFoundError:
        return "0+unknown"


def _ready(model: ServedModel) -> ModelReady:
    return ModelReady(
        name=model.name, version=model.version, ready=model.ready, state=model.state.value, reason=model.reason
    )


def _ready_response(model: ServedModel) -> JSONResponse:
    body = _ready(model)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="normserve", version=_server_version(), extensions=EXTENSIONS)


@router.get("/health/live")
async def live() -> dict[str, bool]:
    """The process is up and answering."""
    return {"live": True}


@router.get("/health/ready", response_model=ServerReady, responses={503: {"model": ServerReady}})
async def ready(repo: RepositoryDep) -> JSONResponse:
    """Every model is ready (or, with strict readiness off, at least one)."""
    body = ServerReady(ready=repo.ready(), models=[_ready(m) for m in repo.all()])
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/models/{name}/ready", response_model=ModelReady, responses={503: {"model": ModelReady}})
async def model_ready(name: str, repo: RepositoryDep) -> JSONResponse:
    return _ready_response(repo.find(name))


@router.get(
    "/models/{name}/versions/{version}/ready", response_model=ModelReady, responses={503: {"model": ModelReady}}
)
async def model_version_ready(name: str, version: str, repo: RepositoryDep) -> JSONResponse:
    return _ready_response(repo.find(name, version))


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


@router.get("/models/{name}", response_model=ModelMetadata)
async def model_metadata(name: str, repo: RepositoryDep) -> ModelMetadata:
    return _metadata(repo, name, None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata)
async def model_version_metadata(name: str, version: str, repo: RepositoryDep) -> ModelMetadata:
    return _metadata(repo, name, version)
