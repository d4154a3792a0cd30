"""The `config.json` that sits beside every `model.onnx` in the model repository.

The exporter writes it and the service reads it, so this pydantic schema is the one contract
between them. It records what the graph takes and returns, how clients' images become the
input tensor, the exact model config and weights it was built from, and the parity figure.

    model_repository/
      gncnn/1/model.onnx
      gncnn/1/config.json
      in_autoencoder/1/model.onnx
      in_autoencoder/1/config.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"

Task = Literal["classification", "denoising"]


class TensorSpec(BaseModel):
    """One graph input or output, in Open Inference Protocol terms (-1 = dynamic)."""

    name: str
    datatype: str  # "FP32"
    shape: list[int]


class Preprocessing(BaseModel):
    """How a client's image becomes the input tensor; normalisation is inside the graph."""

    color: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    datatype: Literal["FP32"] = "FP32"
    value_range: tuple[float, float] = (0.0, 1.0)
    resize: tuple[int, int] | None = None  # (H, W) every image is resized to; None = native size
    resample: Literal["bilinear"] = "bilinear"
    min_side: int = 1  # smallest H or W the graph accepts at native size
    alpha: Literal["composite_on_white"] = "composite_on_white"
    normalization: str = "inside the graph"


class FeatureLevel(BaseModel):
    """One pyramid level: which output holds it, its channels and stride."""

    name: str  # "P3"
    output: str  # graph output name, "p3"
    channels: int
    stride: int


class WeightsRecord(BaseModel):
    file: str  # file name of the safetensors the graph was exported from
    sha256: str
    trained: bool
    extra: dict[str, Any] = Field(default_factory=dict)


class DynamicBatching(BaseModel):
    """Optional per-model batching limits; a key left out takes the server's NORMSERVE_* setting."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(None, ge=1)
    max_queue_delay_ms: float | None = Field(None, ge=0)
    max_queue_size: int | None = Field(None, ge=1)


class ModelConfigFile(BaseModel):
    """Everything the service needs to serve one model version."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    kind: str  # the model kind in models.registry
    task: Task
    platform: Literal["onnxruntime_onnx"] = "onnxruntime_onnx"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    labels: list[str] | None = None
    preprocessing: Preprocessing
    feature_info: list[FeatureLevel] | None = None
    model: dict[str, Any]  # {"kind": ..., "config": {...}}: rebuilds the torch module exactly
    weights: WeightsRecord
    export: dict[str, Any] = Field(default_factory=dict)  # tool versions, opset, time
    parity: dict[str, Any] = Field(default_factory=dict)  # max |torch - ORT| and the shapes tried
    # int8 graphs: how they were quantized and how well they agree with the fp32 export
    quantization: dict[str, Any] | None = None
    ops: dict[str, int] = Field(default_factory=dict)  # op type -> count in the graph
    metrics: dict[str, Any] = Field(default_factory=dict)  # evaluation results, when known
    dynamic_batching: DynamicBatching | None = None  # overrides the batching settings for this model

    @classmethod
    def load(cls, path: Path) -> ModelConfigFile:
        return cls.model_validate_json(path.read_bytes())

    @property
    def tta(self) -> str:
        """The test-time augmentation inside the graph ("none" for graphs exported without it)."""
        return str(self.export.get("tta", "none"))

    @property
    def precision(self) -> str:
        """The graph's numeric precision: the quantization mode, or fp32."""
        return str(self.quantization["mode"]) if self.quantization else "fp32"

    def dump(self, path: Path) -> None:
        # An absent batching block stays absent (the exporter does not write one).
        # So is quantization for an fp32 graph.
        exclude = {k for k in ("dynamic_batching", "quantization") if getattr(self, k) is None}
        path.write_text(self.model_dump_json(indent=2, exclude=exclude or None) + "\n")


# Output names each task's graph must have (the graph contract).
LOGITS_OUTPUT = "logits"
RECONSTRUCTION_OUTPUT = "reconstruction"
REQUIRED_OUTPUTS: dict[str, str] = {"classification": LOGITS_OUTPUT, "denoising": RECONSTRUCTION_OUTPUT}
