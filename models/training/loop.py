"""The epoch loop both models train with (`fit`), and what it is given per model (`TrainingTask`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from normserve.models.registry import ModelSpec
from normserve.models.training.config import TrainConfig
from normserve.models.training.optim import make_optimizer, make_scheduler
from normserve.models.training.plots import plot_curves
from normserve.models.training.run_folder import (
    CHECKPOINT,
    WEIGHTS,
    RunState,
    load_checkpoint,
    load_init_weights,
    save_checkpoint,
    save_run,
    write_metrics,
)
from normserve.models.weights import WeightsInfo

log = logging.getLogger(__name__)


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


def cpu_autocast(bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """CPU bfloat16 autocast when `bf16` (`--bf16`), else nothing."""
    if bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainingTask:
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


def fit(task: TrainingTask, cfg: TrainConfig) -> dict[str, Any]:
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
            with cpu_autocast(cfg.bf16):
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
