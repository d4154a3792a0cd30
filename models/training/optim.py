"""Optimizers and learning-rate schedules by name (`--optimizer`, `--schedule`; the names are
listed torch-free in `models/train_args.py`, and a test checks the two agree)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from normserve.models.training.config import TrainConfig


def _sgd(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)


def _adamw(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


_OPTIMIZERS: dict[str, Callable[[Any, TrainConfig], torch.optim.Optimizer]] = {"sgd": _sgd, "adamw": _adamw}


def _onecycle(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine to 0 (a one-cycle shape without momentum cycling)."""
    warm = max(1, int(cfg.warmup_frac * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _cosine(step: int, total: int, cfg: TrainConfig) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def _constant(step: int, total: int, cfg: TrainConfig) -> float:
    return 1.0


_SCHEDULES: dict[str, Callable[[int, int, TrainConfig], float]] = {
    "onecycle": _onecycle,
    "cosine": _cosine,
    "constant": _constant,
}


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: {sorted(table)}") from None


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norm scales/shifts and biases (1-d tensors): decaying them only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return _lookup(_OPTIMIZERS, cfg.optimizer, "optimizer")(groups, cfg)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    fn = _lookup(_SCHEDULES, cfg.schedule, "schedule")
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: fn(step, total_steps, cfg))
