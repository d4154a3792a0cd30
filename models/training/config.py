"""What a training run is configured with: the settings both loops share, each task's own, and
the served model config that a run's `model` overrides start from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from normserve.models.serialization import ConfigMixin
from normserve.models.weights import load_spec, shipped_spec_path


@dataclass
class TrainConfig(ConfigMixin):
    """Settings shared by both loops."""

    data: str = ""  # training data (CIFAR zip/folder/batches, or a folder of clean images)
    out: str = "runs/train"  # run folder
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1  # peak learning rate
    weight_decay: float = 5e-4
    optimizer: str = "sgd"  # "sgd" (nesterov) | "adamw"
    momentum: float = 0.9  # SGD momentum
    schedule: str = "onecycle"  # "onecycle" | "cosine" | "constant"
    warmup_frac: float = 0.15  # onecycle: fraction of steps spent warming up
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    seed: int = 0
    threads: int = 2  # torch intra-op threads
    bf16: bool = False  # CPU autocast to bfloat16 (fast on CPUs with AVX512-BF16/AMX)
    resume: bool = False  # continue from out/checkpoint.pt if it exists
    stop_after: int = 0  # > 0: leave after this many epochs of this invocation (time-sliced runs; resume later)
    progress: bool = True  # tqdm bar
    max_steps_per_epoch: int = 0  # > 0 caps optimizer steps per epoch (timing runs, tests)
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the model config
    init_from: str = ""  # safetensors weights to start from (fine-tuning / a warm restart); "" = random init
    average_from: int = 0  # > 0: the run's result is the mean of the weights after epochs average_from..epochs (SWA)
    command: str = ""  # the command line that started the run (recorded in the weights)


@dataclass
class ClassifierTrainConfig(TrainConfig):
    cache_dir: str = ".cache"  # decoded CIFAR arrays
    label_smoothing: float = 0.1
    augment_pad: int = 4  # random-crop padding; 0 disables crop and flip
    cutout: int = 0  # side of the square zeroed per training image (DeVries & Taylor); 0 disables
    teachers: list[str] = field(default_factory=list)  # trained run folders to distil from (mean of their logits)
    kd_alpha: float = 0.9  # weight of the distillation term; 1 - kd_alpha weighs the label loss
    kd_temperature: float = 4.0  # softmax temperature of the distillation term (Hinton et al.)
    eval_batch_size: int = 500
    eval_subset: int = 2000  # test images scored after intermediate epochs (fixed random subset); 0 = all


@dataclass
class DenoiserTrainConfig(TrainConfig):
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    schedule: str = "cosine"
    grad_clip: float = 1.0
    patch_size: int = 96
    patches_per_epoch: int = 432 * 16  # ~16 random patches per CBSD432 image
    sigma_max: float = 55.0  # blind training noise, sigma ~ U[0, sigma_max] on the 0-255 scale
    clip_fraction: float = 0.0  # share of patches whose noisy version is clipped and rounded to 8 bits (PNG)
    test_data: str = ""  # folder of clean test images (CBSD68); empty skips evaluation
    eval_sigma: float = 25.0
    eval_seed: int = 0
    eval_limit: int = 0  # > 0 evaluates only the first N test images (tests)


def shipped_config(kind: str) -> dict[str, Any]:
    """The served recipe's model config (`models/configs/<kind>.json`): what training starts from."""
    return dict(load_spec(shipped_spec_path(kind)).config.to_dict())
