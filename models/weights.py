"""Weights files: safetensors state dicts plus string metadata (trained or not, labels, the model
spec that rebuilds them, seed).

Nothing here unpickles: a weights file a user supplies can only hold tensors and strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from normserve.models.registry import ModelSpec, build_model


def shipped_dir() -> Path:
    """Folder of the configs and weights that ship with the package."""
    return Path(str(resources.files("normserve.models")))


def shipped_spec_path(kind: str) -> Path:
    return shipped_dir() / "configs" / f"{kind}.json"


def shipped_weights_path(kind: str) -> Path:
    return shipped_dir() / "weights" / f"{kind}.safetensors"


def load_spec(path: str | Path) -> ModelSpec:
    return ModelSpec.from_dict(json.loads(Path(path).read_text()))


@dataclass
class WeightsInfo:
    """Metadata carried inside a weights file."""

    trained: bool
    labels: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # training command, metrics, seed, ...
    # The model spec ({"kind", "config"}) these weights were built with: `normserve export` rebuilds
    # the module from it when no --config is given. Absent in files written before it was recorded.
    model: dict[str, Any] | None = None

    def to_metadata(self) -> dict[str, str]:
        meta = {"trained": json.dumps(self.trained), "extra": json.dumps(self.extra, sort_keys=True)}
        if self.labels is not None:
            meta["labels"] = json.dumps(self.labels)
        if self.model is not None:
            meta["model"] = json.dumps(self.model, sort_keys=True)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None) -> WeightsInfo:
        meta = meta or {}
        labels = json.loads(meta["labels"]) if "labels" in meta else None
        return cls(
            trained=json.loads(meta.get("trained", "false")),
            labels=labels,
            extra=json.loads(meta.get("extra", "{}")),
            model=json.loads(meta["model"]) if "model" in meta else None,
        )

    def spec(self) -> ModelSpec | None:
        """The model spec recorded in the file, or None for a file that records none."""
        return ModelSpec.from_dict(self.model) if self.model is not None else None


def save_weights(model: nn.Module, path: str | Path, info: WeightsInfo) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=info.to_metadata())


def read_weights_info(path: str | Path) -> WeightsInfo:
    with safe_open(str(path), framework="pt") as f:
        return WeightsInfo.from_metadata(f.metadata())


def random_init(spec: ModelSpec, seed: int) -> nn.Module:
    """A freshly initialised model, reproducible from `seed`."""
    torch.manual_seed(seed)
    return build_model(spec)
