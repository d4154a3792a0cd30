"""What each kind of model does with an image, on one object per kind (after LitServe's
decode_request → predict → encode_response): `ClassificationTask` (decode → tensor → run →
softmax / top-k; the feature maps) and `DenoisingTask` (decode → tensor → tiled run → 8-bit
image). A loaded version holds the task of its config.json's kind (`ServedModel.task`).

The image routes (routes/images.py) are thin adapters around the `async` methods here, which
reserve the request's memory and leave the event loop for large work (governor.py), and run the
model through its own batcher (`ServedModel.infer`). Evaluation and scripts call the same pre-
and post-processing, and the same tiled run (`tiled_run`), on a version opened without a server
(`ServedModel.predict`), so what they measure is what is served. The V2 classification
extension ranks with the same `top_k`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
from starlette.requests import Request

from normserve.contract import LOGITS_OUTPUT, RECONSTRUCTION_OUTPUT, ModelConfigFile
from normserve.service.budget import encode_bytes, run_bytes, tensor_bytes
from normserve.service.errors import InvalidInput, PayloadTooLarge
from normserve.service.governor import decode_in_thread, in_thread, request_deadline, reserve
from normserve.service.imaging import (
    DecodedImage,
    DecodeLimits,
    DecodePlan,
    check_encodable,
    decode_planned,
    open_image,
    pad_to_min_side,
    plan_decode,
    to_tensor,
    to_uint8_image,
)
from normserve.service.settings import Settings
from normserve.service.tiling import Blend, InPlaceTiles, TiledImage, fits_one_tile
from normserve.service.tracing import stage

if TYPE_CHECKING:
    from normserve.service.model import ServedModel

DEFAULT_TOP_K = 5
INLINE_MAX_BYTES = 64 * 1024  # a body this small has its header read on the event loop


# -- post-processing shared by every path ------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities of one row of logits (float64)."""
    z = logits.astype(np.float64) - logits.max()
    e = np.exp(z)
    return np.asarray(e / e.sum())


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` highest scores of each row (N, ...) → (N, min(k, classes)), highest
    first; equal scores keep the lower index first (a stable sort). /classify, the V2
    classification extension and evaluation's top-5 all rank with this."""
    rows = scores if scores.ndim == 2 else scores.reshape(scores.shape[0], -1)
    return np.argsort(-rows, axis=1, kind="stable")[:, :k]


# -- pre-processing: one image file into the model's input, within the request's memory budget ------
def decode_limits(settings: Settings) -> DecodeLimits:
    return _limits(settings.max_jpeg_scans, settings.max_pixels_per_byte)


@functools.lru_cache(maxsize=8)
def _limits(max_jpeg_scans: int, max_pixels_per_byte: int) -> DecodeLimits:  # one object, not one per request
    return DecodeLimits(max_jpeg_scans, max_pixels_per_byte)


def check_native_size(
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


async def decode_input(
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
    return await decode_in_thread(request, plan.decoded_pixels, _decode_tensor, plan, size)


# -- the tasks --------------------------------------------------------------------------------------
class ClassificationTask:
    """A classifier: an image resized to the model's input → logits → softmax and top-k labels;
    or the image (resized or at its own size) → the feature pyramid's maps."""

    kind: ClassVar[str] = "classification"

    def __init__(self, model: ServedModel, config: ModelConfigFile, settings: Settings) -> None:
        self.model, self.config, self.settings = model, config, settings
        self.input = config.inputs[0].name
        self.size = config.preprocessing.resize
        self.labels = config.labels or []

    def tensor(self, image: DecodedImage) -> np.ndarray:
        """The model input (1, 3, H, W) for one decoded image, as /classify prepares it."""
        return to_tensor(image, self.size)

    def logits(self, images: Sequence[DecodedImage], batch_size: int) -> np.ndarray:
        """Logits (N, classes) for `images`, `batch_size` at a time, without the batcher."""
        out = []
        for start in range(0, len(images), batch_size):
            x = np.concatenate([self.tensor(im) for im in images[start : start + batch_size]])
            out.append(self.model.predict({self.input: x}, [LOGITS_OUTPUT])[LOGITS_OUTPUT])
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def predictions(self, logits: np.ndarray, k: int | None) -> list[dict[str, Any]]:
        """The top-k labels of one row of logits with their probabilities. Clamped to the class
        count, never refused: a 2-class model answers a plain request (top-5 by default) with both
        classes, as `class_count` of the V2 classification extension does."""
        probs = softmax(logits)
        top = top_k(probs[None], min(k or DEFAULT_TOP_K, len(self.labels)))[0]
        return [{"label": self.labels[i], "index": int(i), "probability": float(probs[i])} for i in top]

    async def classify(self, request: Request, data: bytes, k: int | None) -> dict[str, Any]:
        """/classify after the request is read: its answer (ClassifyResponse's fields)."""
        model, config = self.model, self.config
        with stage(request, "decode"):
            image, x = await decode_input(request, data, self.settings, self.size, self.kind)
        out = await model.infer({self.input: x}, [LOGITS_OUTPUT], request.state, deadline=request_deadline(request))
        with stage(request, "encode"):
            return {
                "model": model.name,
                "version": model.version,
                "trained": config.weights.trained,
                "input": {"width": image.width, "height": image.height, "format": image.format},
                "predictions": self.predictions(out[LOGITS_OUTPUT][0], k),
            }

    def _feature_answer_bytes(self) -> float:
        """Bytes per pixel of the run that the feature maps take in a /features answer: the maps
        (4 B a value), their bytes, base64 and the JSON document (measured: about 6 copies' worth)."""
        values = sum(lv.channels / lv.stride**2 for lv in self.config.feature_info or [])
        return 6 * 4 * values

    async def features(
        self, request: Request, data: bytes, resize: bool
    ) -> tuple[DecodedImage, np.ndarray, dict[str, np.ndarray]]:
        """/features after the request is read: (the image, the model input, the maps by output name)."""
        config, settings = self.config, self.settings
        levels = config.feature_info or []
        if not levels:
            raise InvalidInput(f"model {self.model.key} declares no feature pyramid")
        answer = self._feature_answer_bytes()
        with stage(request, "decode"):
            if resize:
                image, x = await decode_input(request, data, settings, self.size, self.kind, outputs_per_pixel=answer)
            else:  # native size: checked from the header, before any pixel is decoded
                image, x = await decode_input(
                    request,
                    data,
                    settings,
                    None,
                    self.kind,
                    lambda w, h: check_native_size(w, h, config, settings.max_features_pixels, "/features"),
                    outputs_per_pixel=answer,
                )
        out = await self.model.infer(
            {self.input: x}, [lv.output for lv in levels], request.state, deadline=request_deadline(request)
        )
        return image, x, out


# The tiled run, step by step: yields each model input, is sent the model's output for it, and
# returns the result.
TiledRun = Generator[np.ndarray, np.ndarray, np.ndarray]


def tiled_run(
    image: np.ndarray, tile: int, overlap: int, batch: int, blend: Blend = "cosine", *, in_place: bool = False
) -> TiledRun:
    """Denoise `image` (H, W, 3; uint8, scaled by 1/255, or float32 as is) in overlapping tiles of
    `tile` a side, `batch` tiles per model call, blended back together (service/tiling.py); an
    image within one tile runs whole. Returns (H, W, 3) float32; with `in_place` (a writable
    uint8 image: /reconstruct), the uint8 result, written over `image` when tiled (the same values
    as float_to_uint8 of the float result).

    A generator, so the one loop serves every caller: /reconstruct awaits the model's batcher
    between steps and runs each step in a thread (`DenoisingTask.reconstruct`), evaluation and
    scripts/tile_gap.py call the model directly (`denoise`)."""
    h, w = image.shape[:2]
    if fits_one_tile(h, w, tile):
        if image.dtype == np.uint8:
            x = to_tensor(DecodedImage(image, ""))
        else:
            x = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)
        y = yield x
        del x
        if in_place:
            return to_uint8_image(y[0])
        return np.ascontiguousarray(y[0].transpose(1, 2, 0), dtype=np.float32)
    job = InPlaceTiles(image, tile, overlap, blend) if in_place else TiledImage(image, tile, overlap, blend)
    for chunk in job.chunks(batch):
        job.add(chunk, (yield job.tensor(chunk)))
    return job.image if in_place else job.output


def denoise(
    run: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile: int,
    overlap: int,
    batch: int,
    blend: Blend = "cosine",
) -> np.ndarray:
    """`tiled_run` with `run` ((N, 3, h, w) → (N, 3, h, w) float32) called directly: (H, W, 3) float32."""
    steps = tiled_run(image, tile, overlap, batch, blend)
    x = next(steps)
    while True:
        try:
            x = steps.send(run(x))
        except StopIteration as done:
            result: np.ndarray = done.value
            return result


def _step(steps: TiledRun, y: np.ndarray) -> tuple[bool, np.ndarray]:
    """One step of a tiled run: (False, the next model input) or (True, the result)."""
    try:
        return False, steps.send(y)
    except StopIteration as done:
        return True, done.value


class DenoisingTask:
    """An image-to-image denoiser: an image at its own size (padded to the model's `min_side`) →
    the tiled run → the denoised 8-bit image at the image's size."""

    kind: ClassVar[str] = "denoising"

    def __init__(self, model: ServedModel, config: ModelConfigFile, settings: Settings) -> None:
        self.model, self.config, self.settings = model, config, settings
        self.input = config.inputs[0].name
        self.tile, self.overlap = settings.reconstruct_tile, settings.reconstruct_overlap
        self.batch, self.blend = settings.reconstruct_tile_batch, settings.reconstruct_blend

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model's output for input `x`, without the batcher."""
        y: np.ndarray = self.model.predict({self.input: x}, [RECONSTRUCTION_OUTPUT])[RECONSTRUCTION_OUTPUT]
        return y

    def denoise(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) float32 output for `image` (uint8 or float32), tiled as the server tiles it."""
        return denoise(self.run, image, self.tile, self.overlap, self.batch, self.blend)

    def _reserved_bytes(self, width: int, height: int, body: int, peak_decode: int, as_json: bool) -> int:
        """The request's peak memory: its body, and the largest of the decode, the run (whole, or
        the image finished in place, one band of tile rows in float32 and one tile batch in and
        out) and the encode."""
        tile, px = self.tile, width * height
        if fits_one_tile(height, width, tile):
            running = 3 * px + 2 * tensor_bytes(px) + run_bytes(self.kind, px) + 3 * px
        else:
            tile_px = self.batch * tile * tile
            running = (
                3 * px + 12 * tile * max(width, height) + 2 * tensor_bytes(tile_px) + run_bytes(self.kind, tile_px)
            )
        return body + max(peak_decode, running, 3 * px + encode_bytes(px, as_json=as_json))

    async def reconstruct(
        self, request: Request, data: bytes, encoding: str, as_json: bool
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """/reconstruct after the request is read: the denoised image, uint8 (H, W, 3) at the
        image's size, to be encoded as `encoding` (checked here, before anything is decoded), and
        the (width, height) its file declares."""
        settings, config = self.settings, self.config
        limit, setting = min(
            (settings.max_image_pixels, "NORMSERVE_MAX_IMAGE_PIXELS"),
            (settings.max_reconstruct_pixels, "NORMSERVE_MAX_RECONSTRUCT_PIXELS"),
        )
        limits = decode_limits(settings)
        plan = await in_thread(request, lambda: plan_decode(open_image(data, limit, setting, limits)))
        width, height = plan.size  # checked from the header, before any pixel is decoded
        check_native_size(width, height, config, settings.max_reconstruct_pixels, "/reconstruct", pads=True)
        check_encodable(encoding, width, height)
        need = self._reserved_bytes(width, height, len(data), plan.peak_bytes, as_json)
        await reserve(request, need, f"a {width}x{height} {plan.img.format} image")
        with stage(request, "decode"):
            image = await decode_in_thread(request, plan.decoded_pixels, decode_planned, plan)
        out_h, out_w = image.pixels.shape[:2]  # after EXIF orientation: the answer's size
        image = pad_to_min_side(image, config.preprocessing.min_side)  # answered at its own size, cropped back
        # one model call per batch of tiles, so other requests get the model in between
        steps = tiled_run(image.pixels, self.tile, self.overlap, self.batch, self.blend, in_place=True)
        del image
        deadline = request_deadline(request)
        x = await in_thread(request, next, steps)
        while True:
            out = await self.model.infer({self.input: x}, [RECONSTRUCTION_OUTPUT], request.state, deadline=deadline)
            del x  # free the batch before the next one is cut
            done, x = await in_thread(request, _step, steps, out[RECONSTRUCTION_OUTPUT])
            del out
            if done:
                break
        pixels = x
        if pixels.shape[:2] != (out_h, out_w):  # padded: the answer at the image's own size
            pixels = np.ascontiguousarray(pixels[:out_h, :out_w])
        return pixels, (width, height)


Task = ClassificationTask | DenoisingTask
TASKS: dict[str, type[Task]] = {t.kind: t for t in (ClassificationTask, DenoisingTask)}
T = TypeVar("T", ClassificationTask, DenoisingTask)


def task_for(model: ServedModel, config: ModelConfigFile, settings: Settings) -> Task:
    """The task object of a version, by its config.json's `task`."""
    return TASKS[config.task](model, config, settings)


def task_of(model: ServedModel, kind: type[T]) -> T:
    """`model`'s task when it is a `kind`; 400 for a model of another kind."""
    task = model.task
    if not isinstance(task, kind):
        have = model.config.task if model.config is not None else "unloaded"
        raise InvalidInput(f"model {model.key} is a {have} model; this route needs a {kind.kind} model")
    return task
