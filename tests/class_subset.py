"""A classifier of fewer classes, cut out of an exported one: what a model trained on a few
classes looks like to the service and the evaluator, without training one."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import numpy_helper


def write_class_subset(repository: Path, source: Path, keep: list[str], name: str = "gncnn") -> Path:
    """A classifier of fewer classes, cut out of an exported one (`source`, a version folder):
    only the rows of its final Gemm for the `keep` labels remain, so it is a real classifier with
    the same pyramid outputs, as a model trained on those classes alone would be served."""
    config = json.loads((source / "config.json").read_text())
    rows = [config["labels"].index(label) for label in keep]
    model = onnx.load(str(source / "model.onnx"))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    for init in model.graph.initializer:
        if init.name in gemm.input[1:]:
            array = numpy_helper.to_array(init)[rows]
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    logits = next(o for o in model.graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_value = len(keep)
    version_dir = repository / name / "1"
    version_dir.mkdir(parents=True)
    onnx.save(model, str(version_dir / "model.onnx"))
    config.update(name=name, version="1", labels=keep)
    config["model"]["config"]["num_classes"] = len(keep)
    for output in config["outputs"]:
        if output["name"] == "logits":
            output["shape"] = [-1, len(keep)]
    (version_dir / "config.json").write_text(json.dumps(config, indent=2))
    return version_dir
