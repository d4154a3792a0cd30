"""Training loops for the two default models: the GNCNN CIFAR-10 classifier and the IN denoiser.

Each run writes into its own folder:

* `checkpoint.pt`: model, optimizer, LR schedule and progress after every epoch (our own file,
  loaded with `weights_only=True`); `resume=True` continues from it.
* `metrics.jsonl`: one JSON object per epoch (train loss, eval metric, LR, seconds).
* `curve.png`: training curves (matplotlib, Agg backend).
* `weights.safetensors` + `config.json`: the final weights, marked trained, with the training
  command/config, epochs, wall time, hardware and final metrics in the metadata, and the model
  spec that rebuilds them (the same format as `models/configs/*.json`).

The classifier can learn from trained runs as well as from the labels (`teachers`: knowledge
distillation from the mean of their logits; the teachers' weight hashes are recorded). Either
model can end as the mean of its weights over the last epochs (`average_from`: stochastic weight
averaging; the per-epoch metrics then score the average and, as `iterate_*`, the last weights).

Randomness is derived from (seed, epoch), so a resumed run draws the same batches as an
uninterrupted one. `add_train_arguments` / `run_train` give the CLI its `train` subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel

from normserve.files import sha256_file
from normserve.models.autoencoder import AutoEncoderConfig, SimpleIN_AutoEncoder
from normserve.models.data import (
    NoisyPatchSampler,
    add_eval_noise,
    iterate_batches,
    list_images,
    load_cifar10,
    load_image_folder,
    load_rgb,
    to_tensor_nchw,
)
from normserve.models.gncnn import GNCNN, GNCNNConfig
from normserve.models.registry import ModelSpec, build_model
from normserve.models.serialization import ConfigMixin
from normserve.models.train_args import build_parser
from normserve.models.weights import WeightsInfo, load_spec, save_weights, shipped_spec_path
from normserve.quality import psnr

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVE = "curve.png"
WEIGHTS = "weights.safetensors"
SPEC = "config.json"


# --------------------------------------------------------------------------- configs


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


# --------------------------------------------------------------------------- registries


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


# --------------------------------------------------------------------------- run bookkeeping


def hardware_summary() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}; {os.cpu_count()} CPUs visible, torch threads={torch.get_num_threads()}; torch {torch.__version__}"


def _progress(iterable: Any, total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=2.0, file=sys.stderr)


def _autocast(cfg: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    if cfg.bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def plot_curves(out: Path, history: list[dict[str, Any]], metric: str, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional: training must not fail for want of matplotlib
        log.warning("matplotlib not installed; skipping %s", CURVE)
        return None

    def series(key: str, prefix: str = "") -> list[float]:
        # Intermediate epochs may report a test-subset score ("subset_<key>"); averaging runs also
        # score the last SGD iterate ("iterate_<key>", "iterate_subset_<key>").
        return [r.get(prefix + key, r.get(f"{prefix}subset_{key}", float("nan"))) for r in history]

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
    if any("test_loss" in r or "subset_test_loss" in r for r in history):
        ax1.plot(epochs, series("test_loss"), marker="o", label="test loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, series(metric), marker="o", color="C2", label=metric)
    iterate = series(metric, "iterate_")
    if not all(math.isnan(v) for v in iterate):
        # Averaging runs: the main series is the averaged weights, this one the last SGD iterate.
        ax2.plot(epochs, iterate, marker=".", linestyle="--", color="C3", label=f"{metric}, SGD iterate")
        ax2.legend()
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(metric)
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / CURVE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class _Task:
    """The parts that differ between the classifier and the denoiser."""

    kind: str
    model: nn.Module
    steps_per_epoch: int
    train_batches: Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (prediction, target, input)
    train_metric: Callable[[torch.Tensor, torch.Tensor], float]  # per batch, averaged over the epoch
    train_metric_name: str
    evaluate: Callable[[nn.Module, bool], dict[str, float]]  # (model, final epoch?) -> metrics
    main_metric: str
    labels: list[str] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # recorded in the weights' metadata too


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


def _fit(task: _Task, cfg: TrainConfig) -> dict[str, Any]:
    """The shared epoch loop: train, evaluate, log, checkpoint, and finally write the weights."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = task.model
    if cfg.init_from:
        load_init_weights(model, cfg.init_from)
        log.info("initialised %s from %s", task.kind, cfg.init_from)
    opt = make_optimizer(model, cfg)
    steps = task.steps_per_epoch if cfg.max_steps_per_epoch <= 0 else min(task.steps_per_epoch, cfg.max_steps_per_epoch)
    sched = make_scheduler(opt, cfg, steps * cfg.epochs)
    if not 0 <= cfg.average_from <= cfg.epochs:
        raise ValueError(f"average_from must lie in [0, epochs={cfg.epochs}] (got {cfg.average_from})")
    # Stochastic weight averaging (Izmailov et al. 2018): the mean of the weights after each epoch
    # from `average_from` on. Norm layers here keep no running statistics, so nothing to recompute.
    average = AveragedModel(model) if cfg.average_from > 0 else None
    state = RunState()
    ckpt_path = out / CHECKPOINT
    if cfg.resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, model, opt, sched, average)
        log.info("resumed %s at epoch %d (step %d)", ckpt_path, state.epoch, state.step)
    (out / "train_config.json").write_text(cfg.to_json())

    last = cfg.epochs if cfg.stop_after <= 0 else min(cfg.epochs, state.epoch + cfg.stop_after)
    for epoch in range(state.epoch, last):
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # batches depend on (seed, epoch) only
        model.train()
        t0 = time.perf_counter()
        loss_sum, metric_sum, n_batches = 0.0, 0.0, 0
        bar = _progress(task.train_batches(gen), steps, cfg.progress, f"{task.kind} {epoch + 1}/{cfg.epochs}")
        for x, y in bar:
            with _autocast(cfg):
                pred = model(x)
            loss = task.loss_fn(pred.float(), y, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            state.step += 1
            n_batches += 1
            loss_sum += float(loss.detach())
            metric_sum += task.train_metric(pred.detach().float(), y)
            if cfg.progress and n_batches % 10 == 0:
                bar.set_postfix(
                    loss=f"{loss_sum / n_batches:.4f}", **{task.train_metric_name: f"{metric_sum / n_batches:.4f}"}
                )
            if n_batches >= steps:
                break
        train_s = time.perf_counter() - t0
        averaging = average if average is not None and epoch + 1 >= cfg.average_from else None
        if averaging is not None:
            averaging.update_parameters(model)
        model.eval()
        with torch.inference_mode():
            evals = task.evaluate(model, epoch + 1 == cfg.epochs)
            if averaging is not None:
                # From here on the run's result is the average: it owns the plain metric names.
                iterate = {f"iterate_{k}": v for k, v in evals.items()}
                evals = {**task.evaluate(averaging.module.eval(), epoch + 1 == cfg.epochs), **iterate}
                evals["averaged"] = int(averaging.n_averaged)
        state.epoch = epoch + 1
        state.elapsed_s += time.perf_counter() - t0
        record = {
            "epoch": state.epoch,
            "step": state.step,
            "train_loss": loss_sum / max(1, n_batches),
            f"train_{task.train_metric_name}": metric_sum / max(1, n_batches),
            "lr": opt.param_groups[0]["lr"],
            "epoch_train_s": round(train_s, 2),
            "elapsed_s": round(state.elapsed_s, 2),
            **evals,
        }
        state.history.append(record)
        log.info("epoch %d: %s", state.epoch, json.dumps(record))
        save_checkpoint(ckpt_path, model, opt, sched, state, cfg, average)
        write_metrics(out, state.history)
        plot_curves(out, state.history, task.main_metric, f"{task.kind} ({out.name})")

    final = state.history[-1] if state.history else {}
    extra = {
        "command": cfg.command,
        "train_config": cfg.to_dict(),
        "epochs": state.epoch,
        "planned_epochs": cfg.epochs,  # larger than "epochs" only for a run stopped early (stop_after)
        "steps": state.step,
        "wall_time_s": round(state.elapsed_s, 1),
        "hardware": hardware_summary(),
        "final_metrics": {k: v for k, v in final.items() if k not in ("epoch", "step")},
        **task.provenance,
    }
    result = model
    if average is not None and state.epoch >= cfg.average_from:
        result = average.module
        extra["averaged_epochs"] = [cfg.average_from, state.epoch]
    spec = ModelSpec(task.kind, model.config)  # type: ignore[arg-type]
    save_run(out, spec, result, WeightsInfo(trained=True, labels=task.labels, extra=extra))
    return {"out": str(out), "weights": str(out / WEIGHTS), **extra}


# --------------------------------------------------------------------------- classifier


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def evaluate_classifier(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500, bf16: bool = False
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy on uint8 NCHW `images`."""
    correct, loss, n = 0, 0.0, 0
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for x, y in iterate_batches(images, labels, batch_size):
        with ctx:
            logits = model(x)
        logits = logits.float()
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    return {"test_acc": correct / max(1, n), "test_loss": loss / max(1, n)}


class LogitEnsemble(nn.Module):
    """The mean of several classifiers' logits (the teacher of a distillation run)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def load_teacher(run_dirs: list[str], num_classes: int) -> LogitEnsemble:
    """The trained classifiers in `run_dirs` (what `train` writes: config.json + weights.safetensors), frozen."""
    members = []
    for d in run_dirs:
        spec, model = load_run(d)
        classes = getattr(spec.config, "num_classes", None)
        if spec.kind != "gncnn" or classes != num_classes:
            raise ValueError(f"teacher {d} is a {spec.kind} with {classes} classes; the data has {num_classes}")
        members.append(model)
    return LogitEnsemble(members).eval().requires_grad_(False)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, alpha: float, temperature: float, smoothing: float
) -> torch.Tensor:
    """(1 - alpha) · cross-entropy with the labels + alpha · T² · KL(teacher ‖ student) at temperature T."""
    kl = F.kl_div(
        F.log_softmax(student / temperature, 1),
        F.log_softmax(teacher / temperature, 1),
        log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(student, y, label_smoothing=smoothing)
    return (1 - alpha) * ce + alpha * temperature**2 * kl


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
        with torch.no_grad(), _autocast(cfg):
            target = teacher(x).float()
        return distillation_loss(logits, target, y, cfg.kd_alpha, cfg.kd_temperature, cfg.label_smoothing)

    return loss


def shipped_config(kind: str) -> dict[str, Any]:
    """The served recipe's model config (`models/configs/<kind>.json`): what training starts from."""
    return dict(load_spec(shipped_spec_path(kind)).config.to_dict())


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

    task = _Task(
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
    summary = _fit(task, cfg)
    summary["labels"] = data.label_names
    return summary


# --------------------------------------------------------------------------- denoiser


def evaluate_denoiser(
    model: nn.Module, folder: str | Path, sigma: float = 25.0, seed: int = 0, limit: int = 0
) -> dict[str, float]:
    """Mean PSNR (dB, RGB, peak 1) over the images of `folder`, float protocol: clean/255 plus
    N(0, sigma/255) noise from one fixed-seed generator in sorted file order, not clipped."""
    rng = np.random.default_rng(seed)
    files = list_images(folder)
    if limit > 0:
        files = files[:limit]
    noisy_psnr, out_psnr = [], []
    for path in files:
        clean = load_rgb(path).astype(np.float32) / 255.0
        noisy = add_eval_noise(clean, sigma, rng)
        x = torch.from_numpy(noisy).permute(2, 0, 1)[None]
        y = model(x)[0].permute(1, 2, 0).clamp(0, 1).numpy()
        noisy_psnr.append(psnr(noisy, clean))
        out_psnr.append(psnr(y, clean))
    tag = f"{sigma:g}"
    return {f"psnr_sigma{tag}": float(np.mean(out_psnr)), f"noisy_psnr_sigma{tag}": float(np.mean(noisy_psnr))}


def build_denoiser(overrides: dict[str, Any]) -> SimpleIN_AutoEncoder:
    """The served denoiser's architecture (models/configs/in_autoencoder.json) with `overrides` on top."""
    try:
        return SimpleIN_AutoEncoder(AutoEncoderConfig.from_dict({**shipped_config("in_autoencoder"), **overrides}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--model {json.dumps(overrides)}: not a valid in_autoencoder config ({exc})") from None


def _batch_psnr(pred: torch.Tensor, clean: torch.Tensor) -> float:
    mse = ((pred.clamp(0, 1) - clean) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def train_denoiser(cfg: DenoiserTrainConfig) -> dict[str, Any]:
    """Train the IN autoencoder on random noisy patches of the clean images in `cfg.data`."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    sampler = NoisyPatchSampler(load_image_folder(cfg.data), cfg.patch_size, cfg.sigma_max, cfg.clip_fraction)
    model = build_denoiser(cfg.model)
    steps = max(1, cfg.patches_per_epoch // cfg.batch_size)

    def batches(gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(steps):
            yield sampler.batch(cfg.batch_size, gen)

    def evaluate(m: nn.Module, final: bool) -> dict[str, float]:
        if not cfg.test_data:
            return {}
        return evaluate_denoiser(m, cfg.test_data, cfg.eval_sigma, cfg.eval_seed, cfg.eval_limit)

    task = _Task(
        kind="in_autoencoder",
        model=model,
        steps_per_epoch=steps,
        train_batches=batches,
        loss_fn=lambda pred, clean, _noisy: F.mse_loss(pred, clean),
        train_metric=_batch_psnr,
        train_metric_name="psnr",
        evaluate=evaluate,
        main_metric=f"psnr_sigma{cfg.eval_sigma:g}",
    )
    return _fit(task, cfg)


# --------------------------------------------------------------------------- CLI


_TASKS: dict[str, tuple[type[TrainConfig], Callable[[Any], dict[str, Any]]]] = {
    "classifier": (ClassifierTrainConfig, train_classifier),
    "denoiser": (DenoiserTrainConfig, train_denoiser),
}


def config_from_args(args: argparse.Namespace, command: str | None = None) -> TrainConfig:
    """The task's config from parsed arguments; `command` (default: sys.argv) is recorded in the weights."""
    cfg_cls, _ = _TASKS[args.task]
    fields = set(cfg_cls.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["command"] = command if command is not None else shlex.join(sys.argv)
    return cfg_cls(**values)


def run_train(args: argparse.Namespace, command: str | None = None) -> int:
    """Entry point for the CLI: train, then print the run summary as JSON."""
    cfg = config_from_args(args, command)
    _, train = _TASKS[args.task]
    summary = train(cfg)
    print(json.dumps({k: summary[k] for k in ("out", "weights", "epochs", "wall_time_s", "final_metrics")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    return run_train(build_parser().parse_args(argv), shlex.join(["normserve", "train", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())
