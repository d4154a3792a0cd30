"""`GET /v2/models/{m}[/versions/{v}]/config`: the model configuration in Triton's JSON shape
(its `ModelConfig` protobuf as Triton's HTTP endpoint prints it), which is what `tritonclient`'s
`get_model_config` returns and what perf_analyzer reads: `max_batch_size`, `input`/`output` with
`data_type` and `dims` (without the batch dimension when `max_batch_size` > 0; -1 = dynamic),
`dynamic_batching`, `instance_group`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from normserve.contract import MODEL_FILE, TensorSpec
from normserve.service.errors import ModelNotReady
from normserve.service.model import ServedModel
from normserve.service.settings import Settings
from normserve.service.v2_protocol import encoded_image_inputs

_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"}


class ConfigInput(BaseModel):
    name: str
    data_type: str  # "TYPE_FP32"
    format: Literal["FORMAT_NONE", "FORMAT_NCHW"] = "FORMAT_NONE"
    dims: list[int]
    is_shape_tensor: bool = False
    optional: bool = False


class ConfigOutput(BaseModel):
    name: str
    data_type: str
    dims: list[int]
    label_filename: str = ""
    is_shape_tensor: bool = False


class QueuePolicy(BaseModel):
    timeout_action: Literal["REJECT"] = "REJECT"
    default_timeout_microseconds: int = Field(description="NORMSERVE_REQUEST_TIMEOUT_S; covers queue wait and run")
    allow_timeout_override: bool = False
    max_queue_size: int


class DynamicBatchingConfig(BaseModel):
    preferred_batch_size: list[int] = Field(default_factory=list)
    max_queue_delay_microseconds: int
    preserve_ordering: bool = False
    priority_levels: int = 0
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy


class InstanceGroup(BaseModel):
    name: str
    kind: Literal["KIND_CPU", "KIND_GPU", "KIND_AUTO"]
    count: int = Field(description="worker processes, each running one batch at a time")
    gpus: list[int] = Field(default_factory=list)


class TritonModelConfig(BaseModel):
    """Triton's model configuration, the fields normserve has a value for."""

    name: str
    platform: str
    backend: str = "onnxruntime"
    version_policy: dict[str, dict[str, Any]] = Field(
        description="which versions load: {'all': {}}, {'latest': {'num_versions': N}} or "
        "{'specific': {'versions': [...]}} (NORMSERVE_VERSION_POLICY)"
    )
    max_batch_size: int
    input: list[ConfigInput]
    output: list[ConfigOutput]
    dynamic_batching: DynamicBatchingConfig | None = None
    instance_group: list[InstanceGroup]
    default_model_filename: str = MODEL_FILE
    parameters: dict[str, dict[str, str]] = Field(default_factory=dict)


def _data_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    return spec.shape[1:] if batched else spec.shape


def model_config(model: ServedModel, settings: Settings) -> TritonModelConfig:
    config = model.require_config()
    policy = model.policy  # resolved with the config, when the version loaded
    if policy is None:
        raise ModelNotReady(f"model {model.key} is not ready: {model.reason or model.state.value}")
    batched = policy.max_batch_size > 0
    image_layout = config.preprocessing.layout == "NCHW"
    inputs = [
        ConfigInput(
            name=t.name,
            data_type=_data_type(t.datatype),
            format="FORMAT_NCHW" if image_layout and len(_dims(t, batched)) == 3 else "FORMAT_NONE",
            dims=_dims(t, batched),
        )
        for t in config.inputs
    ]
    outputs = [
        ConfigOutput(name=t.name, data_type=_data_type(t.datatype), dims=_dims(t, batched)) for t in config.outputs
    ]
    batching = None
    if batched:
        batching = DynamicBatchingConfig(
            max_queue_delay_microseconds=round(policy.max_queue_delay_ms * 1000),
            default_queue_policy=QueuePolicy(
                default_timeout_microseconds=round(policy.timeout_s * 1e6), max_queue_size=policy.max_queue_size
            ),
        )
    if model.provider == "CPUExecutionProvider":
        kind, gpus = "KIND_CPU", []
    elif model.provider in _GPU_PROVIDERS:
        kind, gpus = "KIND_GPU", [0]
    else:
        kind, gpus = "KIND_AUTO", []
    # Triton's free-form parameters: the graph's precision (int8 when export quantized it), and the
    # inputs that also take encoded image files (BYTES, shape [N]; v2_protocol.encoded_image_inputs).
    parameters = {"precision": {"string_value": config.precision}}
    encoded = encoded_image_inputs(config)
    if encoded:
        parameters["encoded_image_inputs"] = {"string_value": ",".join(encoded)}
    return TritonModelConfig(
        name=model.name,
        platform=config.platform,
        version_policy=settings.policy_for(model.name).triton(),
        max_batch_size=policy.max_batch_size,
        input=inputs,
        output=outputs,
        dynamic_batching=batching,
        instance_group=[
            InstanceGroup(name=model.name, kind=kind, count=settings.workers * policy.instances, gpus=gpus)
        ],
        parameters=parameters,
    )
