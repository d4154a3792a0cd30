"""Training the GNCNN classifier on CIFAR-10 (or any `train/<class>/`, `test/<class>/` images)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normserve.files import sha256_file
from normserve.models.data import iterate_batches, load_cifar10, to_tensor_nchw
from normserve.models.gncnn import GNCNN, GNCNNConfig
from normserve.models.training.config import ClassifierTrainConfig, shipped_config
from normserve.models.training.distill import distillation_loss, load_teacher
from normserve.models.training.loop import TrainingTask, cpu_autocast, fit
from normserve.models.training.run_folder import WEIGHTS

log = logging.getLogger(__name__)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def evaluate_classifier(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500, bf16: bool = False
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy on uint8 NCHW `images`."""
    correct, loss, n = 0, 0.0, 0
    for x, y in iterate_batches(images, labels, batch_size):
        with cpu_autocast(bf16):
            logits = model(x)
        logits = logits.float()
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    return {"test_acc": correct / max(1, n), "test_loss": loss / max(1, n)}


def classifier_loss(
    cfg: ClassifierTrainConfig, num_classes: int
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy with label smoothing; with `cfg.teachers`, distillation from their mean logits on
    the same augmented batch the student sees (a consistent teacher, Beyer et al. 2022)."""
    if not 0.0 <= cfg.kd_alpha <= 1.0 or cfg.kd_temperature <= 0:
        raise ValueError(
            f"kd_alpha must lie in [0, 1] and kd_temperature be > 0 (got {cfg.kd_alpha}, {cfg.kd_temperature})"
        )
    if not cfg.teachers:
        return lambda logits, y, _x: F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    teacher = load_teacher(cfg.teachers, num_classes)
    log.info("distilling from %d teacher(s): %s", len(cfg.teachers), ", ".join(cfg.teachers))

    def loss(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), cpu_autocast(cfg.bf16):
            target = teacher(x).float()
        return distillation_loss(logits, target, y, cfg.kd_alpha, cfg.kd_temperature, cfg.label_smoothing)

    return loss


def build_classifier(overrides: dict[str, Any]) -> GNCNN:
    """The served classifier's architecture (models/configs/gncnn.json) with `overrides` on top."""
    base = shipped_config("gncnn")
    base.update(overrides)
    try:
        return GNCNN(GNCNNConfig.from_dict(_nested_config(base)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--model {json.dumps(overrides)}: not a valid gncnn config ({exc})") from None


def _nested_config(d: dict[str, Any]) -> dict[str, Any]:
    # ConfigMixin.from_dict rebuilds nested dataclasses from plain dicts only one level deep via
    # the type hint; GNConfig is a plain (frozen) dataclass, so build it here.
    from normserve.models.layers import GNConfig

    d = dict(d)
    if isinstance(d.get("gn"), dict):
        d["gn"] = GNConfig(**d["gn"])
    return d


def train_classifier(cfg: ClassifierTrainConfig) -> dict[str, Any]:
    """Train GNCNN on CIFAR-10 at `cfg.data`; returns the run summary (also stored in the weights)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = load_cifar10(cfg.data, cfg.cache_dir or None)
    train_x, train_y = to_tensor_nchw(data.train.images), torch.from_numpy(data.train.labels)
    test_x, test_y = to_tensor_nchw(data.test.images), torch.from_numpy(data.test.labels)
    # Scoring all 10,000 test images costs ~10% of an epoch on 2 cores; intermediate epochs use a
    # fixed random subset, the final epoch the full test set.
    subset = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(0))[: cfg.eval_subset or None]

    def evaluate(m: nn.Module, final: bool) -> dict[str, float]:
        if final or cfg.eval_subset <= 0 or cfg.eval_subset >= len(test_y):
            return evaluate_classifier(m, test_x, test_y, cfg.eval_batch_size, cfg.bf16)
        res = evaluate_classifier(m, test_x[subset], test_y[subset], cfg.eval_batch_size, cfg.bf16)
        return {f"subset_{k}": v for k, v in res.items()}

    # Default (NCHW) memory format: channels-last makes the convs a little faster on the CPU but
    # GroupNorm three to four times slower, and a step 1.3x slower in all (141 s an epoch vs 109 s).
    model = build_classifier({"num_classes": len(data.label_names), **cfg.model})
    # A data set smaller than one batch still trains: one (smaller) batch per epoch.
    batch_size = min(cfg.batch_size, len(train_y))
    if batch_size < cfg.batch_size:
        log.warning(
            "%d training images, fewer than --batch-size %d: batches of %d", len(train_y), cfg.batch_size, batch_size
        )

    def batches(gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from iterate_batches(
            train_x, train_y, batch_size, gen, cfg.augment_pad, drop_last=True, cutout_size=cfg.cutout
        )

    task = TrainingTask(
        kind="gncnn",
        model=model,
        steps_per_epoch=len(train_y) // batch_size,
        train_batches=batches,
        loss_fn=classifier_loss(cfg, len(data.label_names)),
        train_metric=_accuracy,
        train_metric_name="acc",
        evaluate=evaluate,
        main_metric="test_acc",
        labels=data.label_names,
        # Which weights taught this run, by content: a teacher folder may be retrained later.
        provenance={"teacher_weights_sha256": {d: sha256_file(Path(d) / WEIGHTS) for d in cfg.teachers}}
        if cfg.teachers
        else {},
    )
    summary = fit(task, cfg)
    summary["labels"] = data.label_names
    return summary
