"""The image routes: /classify, /features, /reconstruct.

Each route: read one image (multipart `file` or raw body) → read and check its header → reserve
the request's estimated memory from the worker's budget (service/budget.py, governor.py) →
decode (imaging) → tensor → run the model off the event loop → shape the response. Errors are
raised as domain exceptions.
"""

from __future__ import annotations

import binascii
import functools
import io
from collections.abc import Callable
from typing import Annotated, Any, Literal, cast

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from normserve.contract import LOGITS_OUTPUT, RECONSTRUCTION_OUTPUT, ModelConfigFile, Task
from normserve.service.budget import encode_bytes, run_bytes, tensor_bytes
from normserve.service.deps import RepositoryDep, SettingsDep, run_inference
from normserve.service.errors import InvalidInput, PayloadTooLarge, error_responses
from normserve.service.governor import in_thread, reserve
from normserve.service.imaging import (
    DecodedImage,
    DecodeLimits,
    DecodePlan,
    check_encodable,
    decode_planned,
    encode_image,
    open_image,
    pad_to_min_side,
    plan_decode,
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
from normserve.service.tiling import InPlaceTiles, fits_one_tile
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


def _check_native_size(
    width: int, height: int, config: ModelConfigFile, max_pixels: int, route: str, *, pads: bool = False
) -> None:
    """At most `max_pixels`, and at least the model's `min_side` a side unless the route `pads`."""
    min_side = config.preprocessing.min_side
    if min(width, height) < min_side and not pads:
        raise InvalidInput(f"image is {width}x{height}; {route} needs at least {min_side} pixels a side")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; "
            f"{route} accepts at most {max_pixels} pixels (NORMSERVE_MAX_{route.strip('/').upper()}_PIXELS)"
        )


INLINE_MAX_BYTES = 64 * 1024  # a body this small has its header read on the event loop


def decode_limits(settings: Settings) -> DecodeLimits:
    return _limits(settings.max_jpeg_scans, settings.max_pixels_per_byte)


@functools.lru_cache(maxsize=8)
def _limits(max_jpeg_scans: int, max_pixels_per_byte: int) -> DecodeLimits:  # one object, not one per request
    return DecodeLimits(max_jpeg_scans, max_pixels_per_byte)


def _open_planned(
    data: bytes,
    settings: Settings,
    size: tuple[int, int] | None,
    check: Callable[[int, int], None] | None,
) -> DecodePlan:
    """The header read and checked (`check(width, height)` too), the decode planned: no pixel
    decoded yet."""
    img = open_image(data, settings.max_image_pixels, limits=decode_limits(settings))
    if check is not None:
        check(*img.size)
    return plan_decode(img, size)


def _decode_tensor(plan: DecodePlan, size: tuple[int, int] | None) -> tuple[DecodedImage, np.ndarray]:
    image = decode_planned(plan)
    return image, to_tensor(image, size)


def _model_input_bytes(plan: DecodePlan, size: tuple[int, int] | None, task: str, outputs_per_pixel: float) -> int:
    """Peak working memory of decode → tensor → run for one image, beyond its body: the larger
    of the decode and of what is alive during the run (the RGB array, the resize's copy, the
    tensor, the run, and the outputs with their serialisation)."""
    run_px = size[0] * size[1] if size else plan.out_pixels
    during_run = plan.tensor_phase_bytes(size) + run_bytes(task, run_px) + int(outputs_per_pixel * run_px)
    return max(plan.peak_bytes, during_run)


async def _model_input(
    request: Request,
    data: bytes,
    settings: Settings,
    size: tuple[int, int] | None,
    task: str,
    check: Callable[[int, int], None] | None = None,
    outputs_per_pixel: float = 0.0,
) -> tuple[DecodedImage, np.ndarray]:
    """Decode an image into the model's input (resized to `size` if given), after `check(width,
    height)` on its header, so nothing is decoded for an image the check refuses. The request's
    estimated peak memory (`outputs_per_pixel`: bytes its outputs and their answer take per
    pixel of the run) is reserved from the worker's budget before any pixel is decoded, until
    the request is over (service/governor.py).

    A small image (at most `inline_decode_pixels` pixels, in a body of at most 64 KiB) is decoded
    on the event loop: waking a thread-pool worker costs the loop more than decoding 32x32 pixels
    (measured: README, "Per-request overhead"). Anything larger goes to the pool: its header
    first when the body is over 64 KiB (a header of TIFF or PNG chunks may be long), then the
    decode, with the reservation in between.
    """
    small = len(data) <= INLINE_MAX_BYTES
    if small:  # the header of at most 64 KiB: bounded work
        plan = _open_planned(data, settings, size, check)
    else:
        plan = await in_thread(request, _open_planned, data, settings, size, check)
    w, h = plan.size
    need = len(data) + _model_input_bytes(plan, size, task, outputs_per_pixel)
    await reserve(request, need, f"a {w}x{h} {plan.img.format} image")
    if small and plan.out_pixels <= settings.inline_decode_pixels:
        return _decode_tensor(plan, size)
    return await in_thread(request, _decode_tensor, plan, size)


DEFAULT_TOP_K = 5


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    e = np.exp(z)
    return e / e.sum()


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
    state = request.app.state
    settings: Settings = state.settings
    served, config = _model_for(state.repository, params.model or settings.classifier, params.version, "classification")
    labels = config.labels or []
    # Clamped to the class count, never refused: a 2-class model answers a plain request (top-5 by
    # default) with both classes, as `class_count` of the V2 classification extension does.
    top_k = min(params.top_k or DEFAULT_TOP_K, len(labels))
    with stage(request, "decode"):
        image, x = await _model_input(request, data, settings, config.preprocessing.resize, config.task)
    out = await run_inference(request, served, {config.inputs[0].name: x}, [LOGITS_OUTPUT])
    with stage(request, "encode"):
        probs = _softmax(out[LOGITS_OUTPUT][0])
        top = np.argsort(-probs, kind="stable")[:top_k]
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
    dtype: Annotated[
        Literal["float32", "float16"],
        Query(
            description="precision of the returned maps: float16 halves the answer (at native size a "
            "481x321 image's maps are about 70 MB as float32 .npz, 35 MB as float16)"
        ),
    ] = "float32",
) -> FeaturesResponse | Response:
    """The classifier's feature pyramid (P3, P4, P5) for one image."""
    served, config = _model_for(repo, model or settings.classifier, version, "classification")
    levels = config.feature_info or []
    if not levels:
        raise InvalidInput(f"model {served.key} declares no feature pyramid")
    return await _features(request, data, settings, served, config, resize, dtype)


# Bytes per pixel of the run that the feature maps take in a /features answer: the maps (4 B a
# value), their bytes, base64 and the JSON document (measured: about 6 copies' worth).
def _feature_answer_bytes(config: ModelConfigFile) -> float:
    values = sum(lv.channels / lv.stride**2 for lv in config.feature_info or [])
    return 6 * 4 * values


async def _features(
    request: Request,
    data: bytes,
    settings: Settings,
    served: ServedModel,
    config: ModelConfigFile,
    resize: bool,
    dtype: str = "float32",
) -> FeaturesResponse | Response:
    levels = config.feature_info or []
    answer = _feature_answer_bytes(config)
    with stage(request, "decode"):
        if resize:
            image, x = await _model_input(
                request, data, settings, config.preprocessing.resize, config.task, outputs_per_pixel=answer
            )
        else:  # native size: checked from the header, before any pixel is decoded
            image, x = await _model_input(
                request,
                data,
                settings,
                None,
                config.task,
                lambda w, h: _check_native_size(w, h, config, settings.max_features_pixels, "/features"),
                outputs_per_pixel=answer,
            )
    out = await run_inference(request, served, {config.inputs[0].name: x}, [lv.output for lv in levels])
    with stage(request, "encode"):  # tens of MB of answer at native size: built off the event loop
        return await in_thread(request, _features_response, request, served, config, image, x, out, dtype)


B64_CHUNK = 3 << 20  # bytes base64-encoded per call: a few ms holding the GIL, then others get it


def _base64(data: Any) -> str:
    """base64 of a buffer (bytes, a contiguous array), a chunk at a time: one b64encode of a 66 MB
    feature map holds the GIL (and so the event loop, even from a thread) for ~100 ms; chunks let
    the loop run in between."""
    raw = memoryview(data).cast("B")
    chunks = (binascii.b2a_base64(raw[i : i + B64_CHUNK], newline=False) for i in range(0, len(raw), B64_CHUNK))
    return b"".join(chunks).decode("ascii")


def _json_with_base64(answer: BaseModel, field: str, data: bytes) -> Response:
    """`answer` as JSON with `field` set to the base64 of `data` (in a thread: see _base64)."""
    return Response(orjson.dumps(answer.model_copy(update={field: _base64(data)}).model_dump()), media_type=JSON)


def _features_response(
    request: Request,
    served: ServedModel,
    config: ModelConfigFile,
    image: DecodedImage,
    x: np.ndarray,
    out: dict[str, np.ndarray],
    dtype: str,
) -> Response:
    """The answer, JSON (FeaturesResponse, encoded here rather than by FastAPI on the event loop)
    or .npz; run in a thread."""
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
        input=_info(image),
        tensor_size=list(x.shape[2:]),
        levels=[
            FeatureMap(
                name=lv.name,
                output=lv.output,
                stride=lv.stride,
                channels=lv.channels,
                shape=list(out[lv.output].shape),
                dtype=dtype,
                data=_base64(np.ascontiguousarray(out[lv.output], dtype=wire)),
            )
            for lv in levels
        ],
    )
    return Response(orjson.dumps(answer.model_dump()), media_type=JSON)


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
    limits = decode_limits(settings)
    plan = await in_thread(request, lambda: plan_decode(open_image(data, limit, setting, limits)))
    width, height = plan.size  # checked from the header, before any pixel is decoded
    _check_native_size(width, height, config, settings.max_reconstruct_pixels, "/reconstruct", pads=True)
    encoding = PNG if media == JSON else media
    check_encodable(encoding, width, height)
    tile, tile_batch = settings.reconstruct_tile, settings.reconstruct_tile_batch
    whole = fits_one_tile(height, width, tile)
    px = width * height
    if whole:
        running = 3 * px + 2 * tensor_bytes(px) + run_bytes(config.task, px) + 3 * px
    else:  # the image (finished in place), one band of tile rows in float32, one tile batch in and out
        tile_px = tile_batch * tile * tile
        running = 3 * px + 12 * tile * max(width, height) + 2 * tensor_bytes(tile_px) + run_bytes(config.task, tile_px)
    need = len(data) + max(plan.peak_bytes, running, 3 * px + encode_bytes(px, as_json=media == JSON))
    await reserve(request, need, f"a {width}x{height} {plan.img.format} image")
    with stage(request, "decode"):
        image = await in_thread(request, decode_planned, plan)
    out_h, out_w = image.pixels.shape[:2]  # after EXIF orientation: the answer's size
    name = config.inputs[0].name
    image = pad_to_min_side(image, config.preprocessing.min_side)  # answered at its own size, cropped back
    if whole:  # the whole image in one run
        x = await in_thread(request, to_tensor, image)
        out = await run_inference(request, served, {name: x}, [RECONSTRUCTION_OUTPUT])
        del x
        pixels = await in_thread(request, to_uint8_image, out[RECONSTRUCTION_OUTPUT][0])
        del out
    else:  # one model call per batch of tiles, so other requests get the model in between
        job = InPlaceTiles(image.pixels, tile, settings.reconstruct_overlap, settings.reconstruct_blend)
        for chunk in job.chunks(tile_batch):
            x = await in_thread(request, job.tensor, chunk)
            out = await run_inference(request, served, {name: x}, [RECONSTRUCTION_OUTPUT])
            await in_thread(request, job.add, chunk, out[RECONSTRUCTION_OUTPUT])
        pixels = image.pixels  # denoised in place
        del job, x, out  # free the band and the last batch before encoding
    if pixels.shape[:2] != (out_h, out_w):  # padded: the answer at the image's own size
        pixels = np.ascontiguousarray(pixels[:out_h, :out_w])
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
