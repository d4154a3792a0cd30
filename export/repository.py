"""Write one exported model version into the model repository the service loads."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import cast

import onnx
from torch import nn

from normserve.contract import (
    CONFIG_FILE,
    MODEL_FILE,
    FeatureLevel,
    ModelConfigFile,
    Preprocessing,
    Task,
    TensorSpec,
    WeightsRecord,
)
from normserve.export.onnx_export import INPUT_NAME, MIN_SIDE, OPSET, check_graph, check_parity, export_onnx
from normserve.export.quantize import Int8Request, quantize_checked
from normserve.files import sha256_file
from normserve.models.gncnn import GNCNN
from normserve.models.registry import ModelSpec, build_model, get_kind
from normserve.models.weights import WeightsInfo, random_init, read_weights_info, save_weights

log = logging.getLogger(__name__)

_ONNX_DTYPES: dict[int, str] = {int(onnx.TensorProto.FLOAT): "FP32"}


@dataclass
class ExportResult:
    name: str
    version: str
    directory: Path
    config: ModelConfigFile


def next_version(model_dir: Path) -> str:
    existing = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return str(max(existing, default=0) + 1)


def _tensor_specs(values: list[onnx.ValueInfoProto]) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        specs.append(TensorSpec(name=v.name, datatype=_ONNX_DTYPES[t.elem_type], shape=shape))
    return specs


def _tool_versions() -> dict[str, str]:
    return {p: pkg_version(p) for p in ("torch", "onnx", "onnxscript", "onnxruntime")}


def load_model(spec: ModelSpec, weights: Path | None, random_seed: int | None) -> tuple[nn.Module, WeightsInfo]:
    """The module to export: from a weights file, or (only when asked) freshly initialised."""
    if weights is not None and random_seed is not None:
        raise ValueError("give either a weights file or a random-init seed, not both")
    if weights is None:
        if random_seed is None:
            raise ValueError("no weights file given; pass one, or ask for random init explicitly")
        return random_init(spec, random_seed), WeightsInfo(trained=False, extra={"random_init_seed": random_seed})
    return build_model(spec, weights), read_weights_info(weights)


def export_to_repository(
    spec: ModelSpec,
    repository: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    weights: Path | None = None,
    random_seed: int | None = None,
    labels: list[str] | None = None,
    overwrite: bool = False,
    int8: Int8Request | None = None,
    tta: str = "none",
) -> ExportResult:
    """Export, check and write `<repository>/<name>/<version>/{model.onnx,config.json}`.

    With `int8`, the checked fp32 graph is quantized (export/quantize.py) and the int8 graph is
    what model.onnx holds. `tta="flip"` (classifiers) averages each image's logits with its mirror
    image's inside the graph. Nothing is written unless every check passes; the version directory
    appears atomically.
    """
    name = name or spec.kind
    task = cast(Task, get_kind(spec.kind).task)
    if int8 is not None and task != "classification":
        raise ValueError(
            f"{name}: int8 quantization is checked by top-1 agreement, so it is offered for classifiers only"
        )
    model, info = load_model(spec, weights, random_seed)
    model.eval()
    labels = labels if labels is not None else info.labels
    if task == "classification":
        n_classes = spec.config.num_classes
        if labels is None or len(labels) != n_classes:
            raise ValueError(f"{name}: need {n_classes} class labels (from --labels or the weights file), got {labels}")

    model_dir = repository / name
    version = version or next_version(model_dir)
    target = model_dir / version
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pick another version or overwrite explicitly")

    # Build in a hidden sibling folder (the repository skips dot-folders), then rename: the version
    # appears whole or not at all, and a failed check leaves nothing behind.
    created_model_dir = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    try:
        onnx_path = tmpdir / MODEL_FILE
        fp32_path = tmpdir / ".model.fp32.onnx" if int8 is not None else onnx_path
        proto = export_onnx(spec.kind, model, fp32_path, tta=tta)
        ops = check_graph(spec.kind, proto)
        parity = check_parity(spec.kind, model, fp32_path, tta=tta)
        quantization = None
        if int8 is not None:
            quantization = quantize_checked(fp32_path, onnx_path, int8).to_dict()
            ops = check_graph(spec.kind, onnx.load(str(onnx_path)))  # the op contract holds for int8 too
            fp32_path.unlink()

        if weights is None:  # random init: keep the exact weights beside the graph
            weights_file = tmpdir / "weights.safetensors"
            save_weights(model, weights_file, info)
        else:
            weights_file = weights

        feature_info = None
        preprocessing = Preprocessing(min_side=MIN_SIDE)
        if isinstance(model, GNCNN):
            feature_info = [
                FeatureLevel(name=f["name"], output=f["name"].lower(), channels=f["num_chs"], stride=f["reduction"])
                for f in model.feature_info
            ]
            preprocessing = Preprocessing(resize=model.config.input_size, min_side=1)
        config = ModelConfigFile(
            name=name,
            version=version,
            kind=spec.kind,
            task=task,
            inputs=_tensor_specs(list(proto.graph.input)),
            outputs=_tensor_specs(list(proto.graph.output)),
            labels=labels if task == "classification" else None,
            preprocessing=preprocessing,
            feature_info=feature_info,
            model=spec.to_dict(),
            weights=WeightsRecord(
                file=weights_file.name, sha256=sha256_file(weights_file), trained=info.trained, extra=info.extra
            ),
            export={
                "opset": OPSET,
                "input": INPUT_NAME,
                "dynamic_axes": ["batch", "height", "width"],
                "exporter": "torch.onnx.export(dynamo=True)",
                "tta": tta,
                "tools": _tool_versions(),
                "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
            parity=parity.to_dict(),
            quantization=quantization,
            ops=ops,
            metrics=info.extra.get("metrics", {}),
        )
        config.dump(tmpdir / CONFIG_FILE)
        tmpdir.chmod(0o755)  # mkdtemp is 0700; a server running as another user must read it
        old = None
        if target.exists():  # overwrite: move the old version aside first, so it is gone for
            old = Path(tempfile.mkdtemp(prefix=f".{version}-old-", dir=model_dir))  # microseconds,
            target.rename(old / version)  # not for a whole rmtree (a polling server may rescan then)
        tmpdir.rename(target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if created_model_dir and not any(model_dir.iterdir()):
            model_dir.rmdir()
        raise
    log.info("wrote %s (max |torch - ort| %.2g, int8 %s, ops %s)", target, parity.max_abs_diff, quantization, ops)
    return ExportResult(name, version, target, config)
