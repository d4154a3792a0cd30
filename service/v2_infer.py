"""Open Inference Protocol v2 `infer`, once for HTTP and gRPC: check the inputs and outputs a
request names against the model (v2_protocol), decode encoded images the way /classify does,
run the model through its own dynamic batcher (`ServedModel.infer`), and hand back the outputs to
encode (the classification extension ranks with the classification task's `top_k`).

The transports differ only in how they read a request into `InputTensor`s and write
`OutputTensor`s back (routes/v2.py, grpc_server.py); everything between happens here.

`state` is where a request's bookkeeping goes for the metrics and the access log: `model`,
`model_version` and `batch_size` (rows of the run the request was part of) are set on it;
HTTP passes `request.state`, gRPC an object of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from fastapi.concurrency import run_in_threadpool

from normserve.service import v2_protocol
from normserve.service.budget import Held, run_gated, v2_run_bytes
from normserve.service.errors import InvalidInput, PayloadTooLarge
from normserve.service.imaging import DecodeLimits, DecodePlan, decode_planned, open_image, plan_decode, to_tensor
from normserve.service.model import ServedModel
from normserve.service.state import ServerState
from normserve.service.tasks import decode_limits

MAX_IMAGE_PIXELS_SETTING = "NORMSERVE_MAX_IMAGE_PIXELS"


def plan_images(
    files: list[bytes], size: tuple[int, int] | None, max_pixels: int, limits: DecodeLimits
) -> list[DecodePlan]:
    """Each encoded file's header read and checked as /classify checks it (pixel limit, JPEG
    scans, pixels per byte), its decode planned (draft / box-reduce when it is resized anyway):
    no pixel decoded yet."""
    return [plan_decode(open_image(data, max_pixels, MAX_IMAGE_PIXELS_SETTING, limits), size) for data in files]


def decode_images(plans: list[DecodePlan], size: tuple[int, int] | None) -> np.ndarray:
    """Planned image files → one (N, 3, H, W) float32 batch, each decoded, converted and resized
    as /classify does (service/imaging.py), one at a time."""
    tensors = [to_tensor(decode_planned(plan), size) for plan in plans]
    if len({t.shape for t in tensors}) != 1:
        raise InvalidInput(f"the images decode to different sizes {sorted({t.shape[2:] for t in tensors})}")
    return np.concatenate(tensors)


class DeclaredInput(Protocol):
    """An input as a request declares it: HTTP's parsed JSON header, or gRPC's InferInputTensor."""

    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...


def run_budget(
    model: ServedModel,
    inputs: Sequence[DeclaredInput],
    outputs: list[v2_protocol.RequestOutput],
    binary_output: bool,
) -> int:
    """The estimated working memory of running a V2 request (either transport), from its declared
    shapes, before any array is built; 413 when its run has more pixels (rows x H x W) than the
    model's largest run on the image routes (NORMSERVE_MAX_BATCH_PIXELS; its default: one
    /reconstruct tile batch for the denoiser, NORMSERVE_MAX_FEATURES_PIXELS for the classifier)."""
    config = model.require_config()
    # an encoded-image (BYTES, [N]) input becomes an N x 3 x H x W tensor at the model's input size;
    # decoding the files is reserved by infer(), from each file's header
    resize = config.preprocessing.resize
    shapes = [
        [int(i.shape[0]), 3, *resize] if i.datatype == "BYTES" and resize and len(i.shape) == 1 else list(i.shape)
        for i in inputs
    ]
    first = shapes[0] if shapes else []
    pixels = first[0] * math.prod(first[2:]) if len(first) >= 2 else math.prod(first)
    limit = model.policy.max_batch_pixels if model.policy is not None else 0
    if limit and pixels > limit:
        raise PayloadTooLarge(
            f"input '{inputs[0].name}' of shape {first} is {pixels} pixels (rows x H x W); model "
            f"{model.key} runs at most {limit} at once (NORMSERVE_MAX_BATCH_PIXELS)"
            + ("; POST /reconstruct denoises larger images in tiles" if config.task == "denoising" else "")
        )
    input_bytes = sum(math.prod(shape) * 4 for shape in shapes)
    values = 0
    levels = {lv.output: lv.channels / lv.stride**2 for lv in config.feature_info or []}
    for o in outputs:
        if o.name in levels:
            values += int(levels[o.name] * pixels)
        elif config.task == "denoising":
            values += 3 * pixels
        else:
            values += (first[0] if first else 1) * max(1, len(config.labels or []))
    return v2_run_bytes(config.task, input_bytes, pixels, values, binary_output)


async def infer(
    server: ServerState,
    state: Any,
    model: ServedModel,
    tensors: list[v2_protocol.InputTensor],
    requested: list[v2_protocol.RequestOutput] | None,
    *,
    deadline: float | None = None,
    held: Held | None = None,
) -> list[v2_protocol.OutputTensor]:
    """One V2 inference on a ready `model`: the outputs to answer with, in the order asked for.
    `held`: the request's hold on the worker's memory budget (the caller reserved the run's
    estimate, `run_budget`); decoding encoded images reserves through it and runs as its thread
    steps. `deadline` (loop time) drops the request if it is still queued then."""
    config = model.require_config()
    settings = server.settings
    decoded = v2_protocol.decode_inputs(tensors, config)
    outputs = v2_protocol.requested_outputs(requested, config)
    inputs = decoded.arrays
    for name, files in decoded.images.items():
        limit = model.policy.max_batch_size if model.policy is not None else 0
        if limit and len(files) > limit:  # refused before decoding anything
            raise InvalidInput(
                f"batch of {len(files)} images exceeds max_batch_size {limit} of model {model.key}; "
                "send at most that many images per request"
            )
        size = config.preprocessing.resize
        limits = decode_limits(settings)
        if held is None:
            plans = await run_in_threadpool(plan_images, files, size, settings.max_image_pixels, limits)
        else:
            plans = await held.in_thread(plan_images, files, size, settings.max_image_pixels, limits)
            # decoded one at a time: the largest decode, and the batch's tensors
            peak = max(plan.peak_bytes for plan in plans)
            await held.reserve(peak + len(plans) * plans[0].tensor_phase_bytes(size), f"{len(plans)} encoded images")
        # a large image waits for the worker's one large-decode slot (budget.DecodeGate)
        gate = server.decode_gate.for_pixels(max(plan.decoded_pixels for plan in plans))
        if held is None:
            inputs[name] = await run_gated(gate, decode_images, plans, size)
        else:
            inputs[name] = await held.in_thread(decode_images, plans, size, gate=gate)
    results = await model.infer(inputs, [o.name for o in outputs], state, deadline=deadline)
    return v2_protocol.output_tensors(outputs, results, config.labels)
