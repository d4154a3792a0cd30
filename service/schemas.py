"""Wire schemas of the image routes and the health/metadata routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: `{"error": "what is wrong and what to do about it"}`."""

    error: str


class ImageInfo(BaseModel):
    """The image as the server decoded it (after EXIF orientation)."""

    width: int
    height: int
    format: str


class ModelRef(BaseModel):
    model: str
    version: str
    trained: bool = Field(description="false while the model serves untrained (random-init) weights")


class Prediction(BaseModel):
    label: str
    index: int
    probability: float


class ClassifyResponse(ModelRef):
    """`{"model": "gncnn", "version": "1", "trained": true, "input": {...},
    "predictions": [{"label": "cat", "index": 3, "probability": 0.91}, ...]}`"""

    input: ImageInfo
    predictions: list[Prediction]


class FeatureMap(BaseModel):
    """One pyramid level. `data` is base64 of the tensor's little-endian float32 bytes in C order
    (float16 with `?dtype=float16`)."""

    name: str
    output: str
    stride: int
    channels: int
    shape: list[int]
    dtype: Literal["float32", "float16"] = "float32"
    byte_order: Literal["little"] = "little"
    data: str


class FeaturesResponse(ModelRef):
    input: ImageInfo
    tensor_size: list[int] = Field(description="(H, W) the model ran at")
    levels: list[FeatureMap]


class ReconstructResponse(ModelRef):
    """The reconstruction as base64 PNG (`Accept: application/json`)."""

    shape: list[int] = Field(description="(H, W, 3) of the PNG")
    media_type: Literal["image/png"] = "image/png"
    image: str


class ModelReady(BaseModel):
    name: str
    version: str
    ready: bool
    state: str
    reason: str = ""


class RepositoryIndexRequest(BaseModel):
    """Triton's repository index request (model repository extension)."""

    ready: bool = Field(False, description="list only the versions that are ready")


class ServerReady(BaseModel):
    ready: bool
    models: list[ModelReady]
    reason: str = ""
    workers: int = Field(description="worker processes the server runs (NORMSERVE_WORKERS)")
    workers_ready: int = Field(description="of those, how many are up with their models loaded")


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """Open Inference Protocol v2 model metadata, plus what normserve knows about the model."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    task: str
    trained: bool
    execution_provider: str
    labels: list[str] | None = None
    encoded_image_inputs: list[str] = Field(
        default_factory=list,
        description="inputs that also take encoded image files (PNG, JPEG, ...): datatype BYTES, shape [N], "
        "one file per element, decoded and resized as /classify does (OpenVINO Model Server's binary inputs)",
    )


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]
