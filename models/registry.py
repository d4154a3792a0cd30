"""Model kinds by name: which config class builds which module, and how weights are loaded.

A `ModelSpec` (kind + config) is what the exporter reads and what the model repository
records, so a served model can always be rebuilt exactly from its `config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from normserve.models.autoencoder import AutoEncoderConfig, SimpleIN_AutoEncoder
from normserve.models.gncnn import GNCNN, GNCNNConfig
from normserve.models.serialization import ConfigMixin


@dataclass(frozen=True)
class ModelKind:
    config_cls: type[ConfigMixin]
    model_cls: type[nn.Module]
    task: str  # "classification" | "denoising"


MODEL_KINDS: dict[str, ModelKind] = {
    "gncnn": ModelKind(GNCNNConfig, GNCNN, "classification"),
    "in_autoencoder": ModelKind(AutoEncoderConfig, SimpleIN_AutoEncoder, "denoising"),
}


def get_kind(name: str) -> ModelKind:
    try:
        return MODEL_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown model kind {name!r}; known: {sorted(MODEL_KINDS)}") from None


@dataclass
class ModelSpec:
    """A model kind plus its config: enough to rebuild the module."""

    kind: str
    config: Any  # an instance of MODEL_KINDS[kind].config_cls

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        missing = {"kind", "config"} - set(data)
        if missing:
            raise ValueError(f"model spec lacks {sorted(missing)}")
        kind = get_kind(data["kind"])
        return cls(data["kind"], kind.config_cls.from_dict(data["config"]))

    @classmethod
    def default(cls, kind: str) -> ModelSpec:
        return cls(kind, get_kind(kind).config_cls())


def build_model(spec: ModelSpec, weights: str | Path | None = None) -> nn.Module:
    """Build the module for `spec`; with `weights`, load a safetensors state dict strictly."""
    model = get_kind(spec.kind).model_cls(spec.config)
    if weights is not None:
        from safetensors.torch import load_file

        state = load_file(str(weights))
        problems = state_mismatch(model.state_dict(), {k: tuple(v.shape) for k, v in state.items()})
        if problems:
            raise ValueError(f"weights {weights} do not fit this {spec.kind} config: {problems}")
        model.load_state_dict(state)
    return model


def state_mismatch(own: dict[str, Any], shapes: dict[str, tuple[int, ...]], show: int = 3) -> str:
    """What differs between a module's state dict and a weights file's tensor shapes, in one line
    ("" when they fit): missing and unexpected names, and shapes that differ."""

    def first(items: list[str]) -> str:
        return ", ".join(items[:show]) + (f" and {len(items) - show} more" if len(items) > show else "")

    parts = []
    missing, unexpected = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
    differ = [
        f"{k} is {list(shapes[k])} in the file, {list(v.shape)} in the config"
        for k, v in own.items()
        if k in shapes and tuple(v.shape) != shapes[k]
    ]
    if differ:
        parts.append(first(differ))
    if missing:
        parts.append(f"the file lacks {first(missing)}")
    if unexpected:
        parts.append(f"the config has no {first(unexpected)}")
    return "; ".join(parts)
