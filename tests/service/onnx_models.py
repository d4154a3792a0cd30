"""Tiny ONNX models built in the tests (onnx.helper), written as model repository versions the
service loads like exported ones."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper

# ONNX Runtime 1.31 reads IR version 13 at most; the onnx package writes a newer one by default.
IR_VERSION = 10
FAULT_ROW = 192  # the fault model works on inputs whose element count is a multiple of this


def write_fault_model(repository: Path, name: str = "fault", batch_dim: int | str = "N") -> Path:
    """A "denoiser" that returns its input after a Reshape to rows of FAULT_ROW elements and back.

    It loads and warms up (1x3x64x64 = 64 rows), and serves any input whose element count is a
    multiple of FAULT_ROW (3x8x8 images); for others the Reshape fails inside ONNX Runtime at run
    time, as a real graph bug would. `batch_dim` fixes the first dimension (an int) or not.
    """
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch_dim, 3, "H", "W"])
    out = helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, [batch_dim, 3, "H", "W"])
    rows = helper.make_tensor("rows", TensorProto.INT64, [2], [-1, FAULT_ROW])
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["image", "rows"], ["flat"]),
            helper.make_node("Shape", ["image"], ["shape"]),
            helper.make_node("Reshape", ["flat", "shape"], ["reconstruction"]),
        ],
        name,
        [image],
        [out],
        [rows],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    version_dir = repository / name / "1"
    version_dir.mkdir(parents=True)
    onnx.save(model, str(version_dir / "model.onnx"))
    first = batch_dim if isinstance(batch_dim, int) else -1
    spec = {"datatype": "FP32", "shape": [first, 3, -1, -1]}
    config = {
        "name": name,
        "version": "1",
        "kind": "test_fault",
        "task": "denoising",
        "inputs": [{"name": "image", **spec}],
        "outputs": [{"name": "reconstruction", **spec}],
        "preprocessing": {},
        "model": {"kind": "test_fault", "config": {}},
        "weights": {"file": "none", "sha256": "0" * 64, "trained": False},
    }
    (version_dir / "config.json").write_text(json.dumps(config, indent=2))
    return version_dir
