"""The image routes: /classify, /features, /reconstruct.

Each route: read one image (multipart `file` or raw body) → decode (imaging) → tensor → run the
model off the event loop → shape the response. Errors are raised as domain exceptions.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Annotated, Any, cast

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, Field

from normserve.contract import LOGITS_OUTPUT, RECONSTRUCTION_OUTPUT, ModelConfigFile, Task
from normserve.service.deps import RepositoryDep, SettingsDep, run_inference
from normserve.service.errors import InvalidInput, PayloadTooLarge, error_responses
from normserve.service.imaging import (
    DecodedImage,
    check_encodable,
    decode_image,
    decode_opened,
    encode_image,
    float_to_uint8,
    open_image,
    to_tensor,
    to_uint8_image,
)
from normserve.service.inputs import IMAGE_BODY_OPENAPI, ImageBytes, negotiate, query_params, read_image_bytes
from normserve.service.model import ServedModel
from normserve.service.repository import ModelRepository
from normserve.service.schemas import (
    ClassifyResponse,
    ErrorResponse,
    FeatureMap,
    FeaturesResponse,
    ImageInfo,
    ReconstructResponse,
)
from normserve.service.security import check_api_key
from normserve.service.settings import Settings
from normserve.service.tiling import TiledImage, fits_one_tile
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


def _model_for(
    repo: ModelRepository, name: str, version: str | None, task: Task
) -> tuple[ServedModel, ModelConfigFile]:
    model = repo.get(name, version)
    config = model.require_config()
    if config.task != task:
        raise InvalidInput(f"model {model.key} is a {config.task} model; this route needs a {task} model")
    return model, config


def _info(image: DecodedImage) -> ImageInfo:
    return ImageInfo(width=image.width, height=image.height, format=image.format)


def _check_native_size(width: int, height: int, config: ModelConfigFile, max_pixels: int, route: str) -> None:
    min_side = config.preprocessing.min_side
    if min(width, height) < min_side:
        raise InvalidInput(f"image is {width}x{height}; {route} needs at least {min_side} pixels a side")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; "
            f"{route} accepts at most {max_pixels} pixels (NORMSERVE_MAX_{route.strip('/').upper()}_PIXELS)"
        )


INLINE_MAX_BYTES = 64 * 1024  # a body this small has its header read on the event loop


def _open_checked(data: bytes, max_pixels: int, check: Callable[[int, int], None] | None) -> Image.Image:
    img = open_image(data, max_pixels)
    if check is not None:
        check(*img.size)
    return img


def _decode_tensor(img: Image.Image, size: tuple[int, int] | None) -> tuple[DecodedImage, np.ndarray]:
    image = decode_opened(img)
    return image, to_tensor(image, size)


def _open_decode_tensor(
    data: bytes, max_pixels: int, size: tuple[int, int] | None, check: Callable[[int, int], None] | None
) -> tuple[DecodedImage, np.ndarray]:
    return _decode_tensor(_open_checked(data, max_pixels, check), size)


async def _model_input(
    data: bytes,
    settings: Settings,
    size: tuple[int, int] | None,
    check: Callable[[int, int], None] | None = None,
) -> tuple[DecodedImage, np.ndarray]:
    """Decode an image into the model's input (resized to `size` if given), after `check(width,
    height)` on its header, so nothing is decoded for an image the check refuses.

    A small image (at most `inline_decode_pixels` pixels, in a body of at most 64 KiB) is decoded
    on the event loop: waking a thread-pool worker costs the loop more than decoding 32x32 pixels
    (measured: README, "Per-request overhead"). Anything larger goes to the pool, in one trip.
    """
    if len(data) > INLINE_MAX_BYTES or not settings.inline_decode_pixels:
        return await run_in_threadpool(_open_decode_tensor, data, settings.max_image_pixels, size, check)
    img = _open_checked(data, settings.max_image_pixels, check)  # the header of at most 64 KiB: bounded work
    if img.width * img.height <= settings.inline_decode_pixels:
        return _decode_tensor(img, size)
    return await run_in_threadpool(_decode_tensor, img, size)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    e = np.exp(z)
    return e / e.sum()


class ClassifyParams(BaseModel):
    """The query of /classify, validated by this one model on either path that answers it."""

    top_k: int = Field(5, ge=1, description="how many classes to return")
    model: str | None = Field(None, description=MODEL_DOC)
    version: str | None = Field(None, description=VERSION_DOC)


async def classify_response(request: Request, data: bytes, params: ClassifyParams) -> Response:
    """/classify after the request is read: the top-k labels as ClassifyResponse JSON, built with
    orjson rather than validated through the response model on every request (ClassifyResponse
    documents it; the tests validate bodies against it)."""
    state = request.app.state
    settings: Settings = state.settings
    served, config = _model_for(state.repository, params.model or settings.classifier, params.version, "classification")
    labels = config.labels or []
    if params.top_k > len(labels):
        raise InvalidInput(f"top_k={params.top_k} but model {served.key} has {len(labels)} classes")
    with stage(request, "decode"):
        image, x = await _model_input(data, settings, config.preprocessing.resize)
    out = await run_inference(request, served, {config.inputs[0].name: x}, [LOGITS_OUTPUT])
    with stage(request, "encode"):
        probs = _softmax(out[LOGITS_OUTPUT][0])
        top = np.argsort(-probs, kind="stable")[: params.top_k]
        body = {
            "model": served.name,
            "version": served.version,
            "trained": config.weights.trained,
            "input": {"width": image.width, "height": image.height, "format": image.format},
            "predictions": [{"label": labels[i], "index": int(i), "probability": float(probs[i])} for i in top],
        }
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
) -> FeaturesResponse | Response:
    """The classifier's feature pyramid (P3, P4, P5) for one image."""
    served, config = _model_for(repo, model or settings.classifier, version, "classification")
    levels = config.feature_info or []
    if not levels:
        raise InvalidInput(f"model {served.key} declares no feature pyramid")
    with stage(request, "decode"):
        if resize:
            image, x = await _model_input(data, settings, config.preprocessing.resize)
        else:  # native size: checked from the header, before any pixel is decoded
            image, x = await _model_input(
                data,
                settings,
                None,
                lambda w, h: _check_native_size(w, h, config, settings.max_features_pixels, "/features"),
            )
    out = await run_inference(request, served, {config.inputs[0].name: x}, [lv.output for lv in levels])
    with stage(request, "encode"):
        return _features_response(request, served, config, image, x, out)


def _features_response(
    request: Request,
    served: ServedModel,
    config: ModelConfigFile,
    image: DecodedImage,
    x: np.ndarray,
    out: dict[str, np.ndarray],
) -> FeaturesResponse | Response:
    levels = config.feature_info or []
    if negotiate(request.headers.get("accept"), [JSON, NPZ]) == NPZ:
        buf = io.BytesIO()
        arrays = {lv.name: out[lv.output].astype("<f4") for lv in levels}
        cast(Any, np.savez)(buf, **arrays)
        return Response(buf.getvalue(), media_type=NPZ, headers={"X-Model": served.key})
    return FeaturesResponse(
        model=served.name,
        version=served.version,
        trained=config.weights.trained,
        input=_info(image),
        tensor_size=list(x.shape[2:]),
        levels=[
            FeatureMap(
                name=lv.name,
                output=lv.output,
                stride=lv.stride,
                channels=lv.channels,
                shape=list(out[lv.output].shape),
                data=base64.b64encode(np.ascontiguousarray(out[lv.output], dtype="<f4").tobytes()).decode(),
            )
            for lv in levels
        ],
    )


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
    served, config = _model_for(repo, model or settings.denoiser, version, "denoising")
    limit, setting = min(
        (settings.max_image_pixels, "NORMSERVE_MAX_IMAGE_PIXELS"),
        (settings.max_reconstruct_pixels, "NORMSERVE_MAX_RECONSTRUCT_PIXELS"),
    )
    with stage(request, "decode"):
        image = await run_in_threadpool(decode_image, data, limit, setting)  # the size is checked from the header
    _check_native_size(image.width, image.height, config, settings.max_reconstruct_pixels, "/reconstruct")
    encoding = PNG if media == JSON else media
    check_encodable(encoding, image.width, image.height)
    name = config.inputs[0].name
    if fits_one_tile(image.height, image.width, settings.reconstruct_tile):  # the whole image in one run
        x = await run_in_threadpool(to_tensor, image)
        out = await run_inference(request, served, {name: x}, [RECONSTRUCTION_OUTPUT])
        pixels = await run_in_threadpool(to_uint8_image, out[RECONSTRUCTION_OUTPUT][0])
    else:  # one model call per batch of tiles, so other requests get the model in between
        job = TiledImage(
            image.pixels, settings.reconstruct_tile, settings.reconstruct_overlap, settings.reconstruct_blend
        )
        for chunk in job.chunks(settings.reconstruct_tile_batch):
            x = await run_in_threadpool(job.tensor, chunk)
            out = await run_inference(request, served, {name: x}, [RECONSTRUCTION_OUTPUT])
            await run_in_threadpool(job.add, chunk, out[RECONSTRUCTION_OUTPUT])
        pixels = await run_in_threadpool(float_to_uint8, job.output)
        del job, x, out  # free the float image and the last batch before encoding
    with stage(request, "encode"):
        body = await run_in_threadpool(
            lambda: encode_image(
                pixels,
                encoding,
                png_level=settings.png_compress_level,
                jpeg_quality=settings.jpeg_quality,
                webp_quality=settings.webp_quality,
            )
        )
    if media == JSON:
        return ReconstructResponse(
            model=served.name,
            version=served.version,
            trained=config.weights.trained,
            shape=[image.height, image.width, 3],
            image=base64.b64encode(body).decode(),
        )
    return Response(body, media_type=media, headers={"X-Model": served.key})
