"""Tiny ONNX graphs with a known answer, built with onnx.helper, for tests that need a real ONNX
Runtime session whose output can be checked exactly (the shipped models' cannot)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

OPSET = 18
IR_VERSION = 10  # what ONNX Runtime 1.20+ reads (onnx.helper would write its newest)


def pointwise_graph(scale: float = 1.0, shift: float = 0.0, input_name: str = "image", output_name: str = "x") -> bytes:
    """`output = input * scale + shift`, FP32 (N, 3, H, W) with dynamic N, H, W: a model with no
    spatial context, so tiling must not change its result at all. scale=1, shift=0 is the identity."""
    dims = ["N", 3, "H", "W"]
    graph = helper.make_graph(
        [
            helper.make_node("Mul", [input_name, "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "shift"], [output_name]),
        ],
        "pointwise",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, dims)],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
            helper.make_tensor("shift", TensorProto.FLOAT, [], [shift]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def session_runner(model: bytes | Path) -> Callable[[np.ndarray], np.ndarray]:
    """`run(x) -> y` over the first input and output of a CPU ONNX Runtime session."""
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        y: np.ndarray = session.run([output_name], {input_name: x})[0]
        return y

    return run
