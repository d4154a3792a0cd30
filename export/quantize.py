"""Post-training int8 quantization of an exported classifier (ONNX Runtime static quantization).

The fp32 graph the exporter checked is quantized in QDQ form (QuantizeLinear / DequantizeLinear
around each Conv): weights per output channel as int8, activations as uint8 with ranges measured
on calibration images (min/max). ONNX Runtime's CPU provider fuses each QDQ group into an integer
convolution (VNNI where the CPU has it); every other op, GroupNorm's InstanceNormalization
included, stays float. Quantization is an approximation, so the exact parity check of the fp32
export does not apply: instead the int8 graph must pick the same top-1 class as the fp32 graph on
held-out images (`MIN_TOP1_AGREEMENT`), and the agreement and logit error are recorded in
config.json.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from normserve.contract import LOGITS_OUTPUT
from normserve.export.onnx_export import INPUT_NAME, ExportError
from normserve.models.layers import fold_weight_standardization

log = logging.getLogger(__name__)

MIN_TOP1_AGREEMENT = 0.99  # int8 vs fp32 top-1 on the held-out images
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class QuantizationReport:
    """What config.json records about an int8 graph."""

    mode: str
    method: str  # how weights and activations were quantized
    source: str  # where the calibration and check images came from
    calibration_images: int
    check_images: int
    top1_agreement: float  # int8 vs fp32 ORT, on images the calibration did not see
    max_abs_logit_diff: float
    min_top1_agreement: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Int8Request:
    """Quantize the export to int8: images to calibrate on and disjoint ones to check with."""

    calibration: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    check: np.ndarray
    source: str  # where the images came from, for config.json
    min_top1_agreement: float = MIN_TOP1_AGREEMENT


class _Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = (
            {INPUT_NAME: images[i : i + CALIBRATION_BATCH]} for i in range(0, len(images), CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def cifar_calibration_split(
    data: str | Path, calibration: int, check: int, seed: int = 0, cache_dir: str | Path | None = ".cache"
) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random sets of training images (float32 NCHW in [0, 1]) from a CIFAR-10
    source `normserve train classifier --data` accepts: one to calibrate, one to check."""
    from normserve.models.data import load_cifar10  # torch: the export extra

    train = load_cifar10(data, cache_dir).train.images
    if calibration < 1 or check < 1 or calibration + check > len(train):
        raise ValueError(f"need 1 <= calibration, check and calibration + check <= {len(train)} training images")
    idx = np.random.default_rng(seed).permutation(len(train))

    def to_float(rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(train[rows].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0

    return to_float(idx[:calibration]), to_float(idx[calibration : calibration + check])


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, keep_float: Sequence[str] = ()) -> str:
    """Write the QDQ int8 version of `fp32_path` to `out_path`; returns the method, in words.
    The nodes named in `keep_float` stay fp32 (no QDQ around them)."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph cleanup first, as ONNX Runtime's quantization guide asks.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_path),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=list(keep_float),
        )
    return "ORT static QDQ: Conv weights int8 per channel, activations uint8 (min/max calibration)"


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = [session.run([LOGITS_OUTPUT], {INPUT_NAME: images[i : i + 256]})[0] for i in range(0, len(images), 256)]
    return np.concatenate(out)


def check_int8(
    fp32_path: Path, int8_path: Path, images: np.ndarray, min_agreement: float = MIN_TOP1_AGREEMENT
) -> tuple[float, float]:
    """(top-1 agreement, max |logit difference|) of the int8 graph against the fp32 one on
    `images`; raises ExportError below `min_agreement`."""
    ref, got = _logits(fp32_path, images), _logits(int8_path, images)
    agreement = float(np.mean(ref.argmax(1) == got.argmax(1)))
    diff = float(np.abs(ref - got).max())
    log.info("int8 vs fp32 on %d images: top-1 agreement %.4f, max |logit diff| %.3g", len(images), agreement, diff)
    if not agreement >= min_agreement:
        raise ExportError(
            f"int8 graph agrees with the fp32 one on {agreement:.2%} of {len(images)} images' top-1 "
            f"(< {min_agreement:.0%}); calibrate on more or more representative images, or serve fp32"
        )
    return agreement, diff


def quantize_checked(fp32_path: Path, out_path: Path, request: Int8Request) -> QuantizationReport:
    """Quantize, then check against the fp32 graph on the held-out images."""
    method = quantize_int8(fp32_path, out_path, request.calibration)
    agreement, diff = check_int8(fp32_path, out_path, request.check, request.min_top1_agreement)
    return QuantizationReport(
        "int8",
        method,
        request.source,
        len(request.calibration),
        len(request.check),
        agreement,
        diff,
        request.min_top1_agreement,
    )


def check_int8_weights(proto: onnx.ModelProto, model: nn.Module) -> int:
    """Every int8 Conv weight in `proto` must be `model`'s weight rounded to its scale (within half
    a step): proof, without calibration data, that the int8 graph was made from these weights.
    Returns how many weights were checked; raises ExportError on a mismatch or none found."""
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    state = {f"model.{k}": v.detach().numpy() for k, v in fold_weight_standardization(model).state_dict().items()}
    checked = 0
    for name, q in inits.items():
        if not name.endswith("_quantized"):
            continue
        key = name.removesuffix("_quantized")
        if key not in state:
            raise ExportError(f"int8 weight {name} has no counterpart in the model's weights")
        scale, zero = inits[f"{key}_scale"], inits[f"{key}_zero_point"]
        shape = (-1,) + (1,) * (q.ndim - 1)
        weight = (q.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape)
        steps = np.abs(weight - state[key]) / scale.reshape(shape)
        if weight.shape != state[key].shape or not float(steps.max()) <= 0.5 + 1e-3:
            raise ExportError(f"int8 weight {name} is not {key} of these weights rounded to its scale")
        checked += 1
    if not checked:
        raise ExportError("no int8 weights in the graph")
    return checked
