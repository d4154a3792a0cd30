"""The image routes: /classify, /features, /reconstruct — thin adapters over the task objects.

Each route: read one image (multipart `file` or raw body) and its query → find the model version
(repository.py) → its task (tasks.py: decode within the request's memory budget → tensor → run
through the version's batcher (model.py) → post-process) → shape the response (JSON, .npz or an
encoded image, by Accept). Errors are raised as domain exceptions (errors.py).
"""

from __future__ import annotations

import io
from typing import Annotated, Any, Literal, cast

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from normserve.contract import ModelConfigFile
from normserve.service.deps import RepositoryDep, SettingsDep
from normserve.service.errors import error_responses
from normserve.service.governor import in_thread
from normserve.service.imaging import DecodedImage, encode_image
from normserve.service.inputs import IMAGE_BODY_OPENAPI, ImageBytes, negotiate, query_params, read_image_bytes
from normserve.service.large_bodies import PartsResponse, base64_value, json_parts
from normserve.service.model import ServedModel
from normserve.service.schemas import (
    ClassifyResponse,
    ErrorResponse,
    FeatureMap,
    FeaturesResponse,
    ImageInfo,
    ReconstructResponse,
)
from normserve.service.security import check_api_key
from normserve.service.state import request_state
from normserve.service.tasks import DEFAULT_TOP_K, ClassificationTask, DenoisingTask, task_of
from normserve.service.tracing import stage

router = APIRouter(tags=["images"], responses=error_responses(400, 404, 406, 413, 415, 422, 500, 503, 504))

MODEL_DOC = "model name (default: the configured one for this route)"
VERSION_DOC = "model version (default: newest)"
ModelQuery = Annotated[str | None, Query(description=MODEL_DOC)]
VersionQuery = Annotated[str | None, Query(description=VERSION_DOC)]
NPZ = "application/x-npz"
PNG = "image/png"
WEBP = "image/webp"
JPEG = "image/jpeg"
JSON = "application/json"


class ClassifyParams(BaseModel):
    """The query of /classify, validated by this one model on either path that answers it."""

    top_k: int | None = Field(
        None,
        ge=1,
        description=f"how many classes to return (default {DEFAULT_TOP_K}); a model with fewer classes "
        "returns all of them, as the V2 classification extension does",
    )
    model: str | None = Field(None, description=MODEL_DOC)
    version: str | None = Field(None, description=VERSION_DOC)


async def classify_response(request: Request, data: bytes, params: ClassifyParams) -> Response:
    """/classify after the request is read: the top-k labels as ClassifyResponse JSON, built with
    orjson rather than validated through the response model on every request (ClassifyResponse
    documents it; the tests validate bodies against it)."""
    server = request_state(request)
    model = server.repository.get(params.model or server.settings.classifier, params.version)
    body = await task_of(model, ClassificationTask).classify(request, data, params.top_k)
    return Response(orjson.dumps(body), media_type=JSON)


# With NORMSERVE_RAW_ROUTES on (the default) `classify_raw` answers POST /classify below FastAPI's
# routing; this route documents it (OpenAPI) and answers when the setting is off.
@router.post("/classify", response_model=ClassifyResponse, openapi_extra=IMAGE_BODY_OPENAPI)
async def classify(request: Request, data: ImageBytes, params: Annotated[ClassifyParams, Query()]) -> Response:
    """Top-k labels with probabilities for one image (any size or mode; resized to the model's input)."""
    return await classify_response(request, data, params)


async def classify_raw(request: Request) -> Response:
    """POST /classify for `RawRoutes`: the same checks in the same order as the FastAPI route
    (API key, body, query), without its dependency solving."""
    await check_api_key(request)
    data = await read_image_bytes(request)
    return await classify_response(request, data, query_params(ClassifyParams, request))


@router.post(
    "/features",
    response_model=FeaturesResponse,
    openapi_extra=IMAGE_BODY_OPENAPI,
    responses={
        200: {"content": {NPZ: {}}, "description": "JSON, or an .npz of P3/P4/P5 with Accept: application/x-npz"}
    },
)
async def features(
    request: Request,
    data: ImageBytes,
    repo: RepositoryDep,
    settings: SettingsDep,
    resize: Annotated[
        bool, Query(description="resize to the model's input size (false: run at the image's size)")
    ] = True,
    model: ModelQuery = None,
    version: VersionQuery = None,
    dtype: Annotated[
        Literal["float32", "float16"],
        Query(
            description="precision of the returned maps: float16 halves the answer (at native size a "
            "481x321 image's maps are about 70 MB as float32 .npz, 35 MB as float16)"
        ),
    ] = "float32",
) -> FeaturesResponse | Response:
    """The classifier's feature pyramid (P3, P4, P5) for one image."""
    served = repo.get(model or settings.classifier, version)
    image, x, out = await task_of(served, ClassificationTask).features(request, data, resize)
    with stage(request, "encode"):  # tens of MB of answer at native size: built off the event loop
        return await in_thread(
            request, _features_response, request, served, served.require_config(), image, x, out, dtype
        )


def _json_with_base64(answer: BaseModel, field: str, data: bytes) -> Response:
    """`answer` (its `field` empty) as JSON with `field` the base64 of `data`, as parts
    (service/large_bodies.py); run in a thread."""
    return PartsResponse(json_parts(answer.model_dump(), field, [base64_value(data)]), media_type=JSON)


def _features_response(
    request: Request,
    served: ServedModel,
    config: ModelConfigFile,
    image: DecodedImage,
    x: np.ndarray,
    out: dict[str, np.ndarray],
    dtype: str,
) -> Response:
    """The answer, JSON (FeaturesResponse, encoded here rather than by FastAPI on the event loop,
    as parts: service/large_bodies.py) or .npz; run in a thread."""
    levels = config.feature_info or []
    wire = "<f2" if dtype == "float16" else "<f4"  # little-endian on the wire, whatever the host
    if negotiate(request.headers.get("accept"), [JSON, NPZ]) == NPZ:
        buf = io.BytesIO()
        arrays = {lv.name: out[lv.output].astype(wire) for lv in levels}
        cast(Any, np.savez)(buf, **arrays)
        return Response(buf.getvalue(), media_type=NPZ, headers={"X-Model": served.key})
    answer = FeaturesResponse(
        model=served.name,
        version=served.version,
        trained=config.weights.trained,
        input=ImageInfo(width=image.width, height=image.height, format=image.format),
        tensor_size=list(x.shape[2:]),
        levels=[
            FeatureMap(
                name=lv.name,
                output=lv.output,
                stride=lv.stride,
                channels=lv.channels,
                shape=list(out[lv.output].shape),
                dtype=dtype,
                data="",  # filled in by json_parts
            )
            for lv in levels
        ],
    )
    maps = [base64_value(np.ascontiguousarray(out[lv.output], dtype=wire)) for lv in levels]
    return PartsResponse(json_parts(answer.model_dump(), "data", maps), media_type=JSON)


RECONSTRUCT_TYPES = [PNG, WEBP, JPEG, JSON]  # what /reconstruct answers, by Accept; PNG by default


@router.post(
    "/reconstruct",
    response_model=ReconstructResponse,
    openapi_extra=IMAGE_BODY_OPENAPI,
    responses={
        200: {
            "content": {PNG: {}, WEBP: {}, JPEG: {}},
            "description": "the denoised image: PNG (default, lossless), WebP or JPEG (lossy) by Accept, "
            "or JSON with base64 PNG (Accept: application/json)",
        },
        406: {"model": ErrorResponse, "description": "Accept names none of the types above"},
        413: {"model": ErrorResponse, "description": "more pixels than NORMSERVE_MAX_RECONSTRUCT_PIXELS"},
    },
)
async def reconstruct(
    request: Request,
    data: ImageBytes,
    repo: RepositoryDep,
    settings: SettingsDep,
    model: ModelQuery = None,
    version: VersionQuery = None,
) -> ReconstructResponse | Response:
    """The denoised (reconstructed) image at the input's size. Images larger than
    NORMSERVE_RECONSTRUCT_TILE a side run in overlapping tiles that are blended back together."""
    media = negotiate(request.headers.get("accept"), RECONSTRUCT_TYPES, fallback=False)
    served = repo.get(model or settings.denoiser, version)
    encoding = PNG if media == JSON else media
    pixels, (width, height) = await task_of(served, DenoisingTask).reconstruct(
        request, data, encoding, as_json=media == JSON
    )
    config = served.require_config()
    with stage(request, "encode"):
        body = await in_thread(
            request,
            lambda: encode_image(
                pixels,
                encoding,
                png_level=settings.png_compress_level,
                jpeg_quality=settings.jpeg_quality,
                webp_quality=settings.webp_quality,
            ),
        )
    if media == JSON:  # base64 and JSON of up to tens of MB: off the event loop, as /features
        answer = ReconstructResponse(
            model=served.name,
            version=served.version,
            trained=config.weights.trained,
            shape=[height, width, 3],
            image="",
        )
        return await in_thread(request, _json_with_base64, answer, "image", body)
    return Response(body, media_type=media, headers={"X-Model": served.key})
