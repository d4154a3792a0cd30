"""Trace a model to ONNX opset 18 with dynamic batch/height/width, check the graph, measure parity.

Follows timm's `utils/onnx.py`: eval(), a reference run under inference mode, the dynamo
exporter on a small wrapper module with positional inputs only, `onnx.checker` with
`full_check=True`, and a comparison against onnxruntime at an explicit tolerance.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from normserve.contract import LOGITS_OUTPUT, RECONSTRUCTION_OUTPUT
from normserve.export.args import TTA_MODES
from normserve.models.gncnn import GNCNN, PYRAMID_NAMES
from normserve.models.layers import fold_weight_standardization
from normserve.models.registry import get_kind

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME = "image"
MIN_SIDE = 5  # reflect-padded to a multiple of 4, the /4 level needs >= 2 px for instance stats
PARITY_TOLERANCE = 1e-4
PARITY_BATCHES = (1, 8)
PARITY_SIZES = ((32, 32), (64, 48), (37, 53))


class ExportError(RuntimeError):
    """The exported graph broke a contract (opset, op set, parity)."""


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`x` moved by (dy, dx) pixels (at most 1), the border replicated (any size, even 1×1)."""
    h, w = x.shape[-2], x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def _flip_translate(x: torch.Tensor) -> list[torch.Tensor]:
    """The image and its mirror, each as sent and moved one pixel up-left and down-right."""
    mirror = x.flip(-1)
    return [x, mirror, _shift(x, -1, -1), _shift(mirror, -1, -1), _shift(x, 1, 1), _shift(mirror, 1, 1)]


# Test-time augmentation: the views of a batch whose logits the graph averages.
_TTA_VIEWS: dict[str, Callable[[torch.Tensor], list[torch.Tensor]]] = {
    "none": lambda x: [x],
    "flip": lambda x: [x, x.flip(-1)],
    "flip-translate": _flip_translate,
}


class ClassifierGraph(nn.Module):
    """image → (logits, p3, p4, p5): one graph serves /classify and /features.

    With test-time augmentation the logits are the mean of the logits of several views of each
    image, all run as one batch (as in airbench): `flip`, the image and its mirror image (2× the
    compute); `flip-translate`, both of those as sent and moved one pixel diagonally either way
    (6×). The pyramid levels stay those of the image as sent.
    """

    output_names = (LOGITS_OUTPUT, *(n.lower() for n in PYRAMID_NAMES))

    def __init__(self, model: GNCNN, tta: str = "none") -> None:
        super().__init__()
        if tta not in TTA_MODES:
            raise ValueError(f"unknown test-time augmentation {tta!r}; known: {list(TTA_MODES)}")
        self.model = model.eval()
        self.views = _TTA_VIEWS[tta]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = image.shape[0]
        views = self.views(image)
        levels = self.model.forward_pyramid(torch.cat(views) if len(views) > 1 else image)
        logits = self.model.forward_head(levels[-1])
        if len(views) > 1:
            logits = logits.reshape(len(views), n, logits.shape[-1]).mean(0)
            levels = [level[:n] for level in levels]
        return (logits, *levels)


class DenoiserGraph(nn.Module):
    """image → reconstruction."""

    output_names = (RECONSTRUCTION_OUTPUT,)

    def __init__(self, model: nn.Module, tta: str = "none") -> None:
        super().__init__()
        if tta != "none":
            raise ValueError(f"test-time augmentation ({tta!r}) is offered for classifiers only")
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


_GRAPHS: dict[str, type[ClassifierGraph] | type[DenoiserGraph]] = {
    "classification": ClassifierGraph,
    "denoising": DenoiserGraph,
}

# Ops each task's graph must and must not contain. InstanceNormalization appears in both: the
# autoencoder uses it directly and GroupNorm is lowered to it at opset 18.
_REQUIRED_OPS = {"classification": {"InstanceNormalization"}, "denoising": {"InstanceNormalization"}}
_FORBIDDEN_OPS = {"BatchNormalization", "GroupNormalization"}


def wrap_for_export(kind: str, model: nn.Module, tta: str = "none") -> ClassifierGraph | DenoiserGraph:
    """The eval-mode wrapper that is traced: positional input, outputs named by the contract, the
    model in its inference form (weight-standardized convs folded into plain ones), and the
    test-time augmentation `tta` (TTA_MODES, classifiers only)."""
    return _GRAPHS[get_kind(kind).task](fold_weight_standardization(model), tta).eval()  # type: ignore[arg-type]


def export_onnx(
    kind: str, model: nn.Module, path: Path, sample_hw: tuple[int, int] = (32, 32), tta: str = "none"
) -> onnx.ModelProto:
    """Export `model` to `path` at opset 18 with dynamic (batch, height, width)."""
    graph = wrap_for_export(kind, model.eval(), tta)
    in_ch = next(p for p in model.parameters() if p.dim() == 4).shape[1]
    sample = torch.rand(2, in_ch, *sample_hw)
    dims = {
        0: Dim("batch", min=1, max=65536),
        2: Dim("height", min=MIN_SIDE, max=65536),
        3: Dim("width", min=MIN_SIDE, max=65536),
    }
    program = torch.onnx.export(
        graph,
        (sample,),
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=list(graph.output_names),
        dynamic_shapes={"image": dims},
        verbose=False,
    )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path))
    proto = onnx.load(str(path))
    _tidy_output_dims(proto)
    onnx.save(proto, str(path))
    return proto


def _tidy_output_dims(proto: onnx.ModelProto) -> None:
    """Name dynamic output dims after the input's where they are equal by construction.

    The exporter writes symbolic expressions such as `Min(height, 4*(...))` for the cropped
    reconstruction; clients (and the V2 metadata) only need to know the dim is dynamic.
    """
    for out in proto.graph.output:
        for i, d in enumerate(out.type.tensor_type.shape.dim):
            if d.dim_param and i == 0:
                d.dim_param = "batch"
            elif d.dim_param and not d.dim_param.isidentifier():
                d.dim_param = f"{out.name}_dim{i}"


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))


def check_graph(kind: str, proto: onnx.ModelProto) -> dict[str, int]:
    """Checker (full), opset 18, required ops present, forbidden ops absent. Returns op counts."""
    onnx.checker.check_model(proto, full_check=True)
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    if opsets.get("ai.onnx") != OPSET:
        raise ExportError(f"expected opset {OPSET}, graph imports {opsets}")
    counts = op_counts(proto)
    task = get_kind(kind).task
    missing = _REQUIRED_OPS[task] - counts.keys()
    if missing:
        raise ExportError(f"{kind}: graph lacks {sorted(missing)} (ops: {counts})")
    bad = _FORBIDDEN_OPS & counts.keys()
    if bad:
        raise ExportError(f"{kind}: graph holds {sorted(bad)}; instance statistics must be used at inference")
    return counts


@dataclass
class ParityResult:
    max_abs_diff: float
    tolerance: float
    shapes: list[list[int]]

    def to_dict(self) -> dict[str, object]:
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "shapes": self.shapes}


def check_parity(
    kind: str,
    model: nn.Module,
    onnx_path: Path,
    batches: Sequence[int] = PARITY_BATCHES,
    sizes: Sequence[tuple[int, int]] = PARITY_SIZES,
    tolerance: float = PARITY_TOLERANCE,
    seed: int = 0,
    tta: str = "none",
) -> ParityResult:
    """Max |torch - onnxruntime| over every output and shape; raises above `tolerance`."""
    graph = wrap_for_export(kind, model.eval(), tta)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    in_ch = session.get_inputs()[0].shape[1]
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    shapes = []
    for n in batches:
        for h, w in sizes:
            x = torch.rand(n, in_ch, h, w, generator=gen)
            with torch.inference_mode():
                ref = graph(x)
            refs = ref if isinstance(ref, tuple) else (ref,)
            got = session.run(None, {INPUT_NAME: x.numpy()})
            for r, g in zip(refs, got, strict=True):
                if tuple(r.shape) != g.shape:
                    raise ExportError(f"{kind}: shape mismatch at {x.shape}: torch {tuple(r.shape)} vs ORT {g.shape}")
                worst = max(worst, float(np.abs(r.numpy() - g).max()))
            shapes.append([n, in_ch, h, w])
    log.info("%s parity: max |torch - ort| = %.3g over %d shapes", kind, worst, len(shapes))
    if not worst <= tolerance:
        raise ExportError(f"{kind}: ONNX Runtime differs from PyTorch by {worst:.3g} > {tolerance:g}")
    return ParityResult(worst, tolerance, shapes)
