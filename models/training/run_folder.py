"""A run folder's files: the checkpoint a resumed run continues from, `metrics.jsonl`, and the
result (`config.json` + `weights.safetensors`) that `load_run` builds a model from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel

from normserve.models.registry import ModelSpec, build_model
from normserve.models.training.config import TrainConfig
from normserve.models.weights import WeightsInfo, load_spec, save_weights

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVE = "curve.png"
WEIGHTS = "weights.safetensors"
SPEC = "config.json"


@dataclass
class RunState:
    """What a checkpoint restores besides model/optimizer/scheduler tensors."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    elapsed_s: float = 0.0  # training wall time so far, across resumes
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    state: RunState,
    cfg: TrainConfig,
    average: AveragedModel | None = None,
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            **({"average": average.state_dict()} if average is not None else {}),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "elapsed_s": state.elapsed_s,
            "history": json.dumps(state.history),
            "config": cfg.to_json(),
        },
        tmp,
    )
    tmp.replace(path)  # a run killed mid-save keeps the previous checkpoint


def load_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, average: AveragedModel | None = None
) -> RunState:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    if average is not None:
        if "average" not in ckpt:
            raise ValueError(f"{path} holds no averaged weights; it was written by a run without averaging")
        average.load_state_dict(ckpt["average"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    return RunState(ckpt["epoch"], ckpt["step"], ckpt["elapsed_s"], json.loads(ckpt["history"]))


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl from the history (so a resumed run never duplicates lines)."""
    (out / METRICS).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in history))


def load_init_weights(model: nn.Module, path: str | Path) -> None:
    """Copy safetensors weights into `model` (same architecture), e.g. to fine-tune a shipped model."""
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise ValueError(f"--init-from {path}: no such file") from None
    except Exception as exc:  # safetensors' own error type for a file that is not safetensors
        raise ValueError(f"--init-from {path}: not a safetensors weights file ({exc})") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not fit this model: missing {missing}, unexpected {unexpected}, shape mismatch {shapes}"
        )
    model.load_state_dict(state)


def save_run(out: Path, spec: ModelSpec, model: nn.Module, info: WeightsInfo) -> None:
    """A run's result: `config.json` (the spec that rebuilds the model, and a classifier's labels)
    and `weights.safetensors` (which carries both in its metadata too)."""
    out.mkdir(parents=True, exist_ok=True)
    record = spec.to_dict()
    if info.labels is not None:
        record["labels"] = info.labels
    (out / SPEC).write_text(json.dumps(record, indent=2) + "\n")
    info.model = spec.to_dict()
    save_weights(model, out / WEIGHTS, info)


def load_run(run_dir: str | Path) -> tuple[ModelSpec, nn.Module]:
    """The spec and the model (eval mode) that `save_run` wrote into `run_dir`."""
    spec = load_spec(Path(run_dir) / SPEC)
    return spec, build_model(spec, Path(run_dir) / WEIGHTS).eval()
