"""`normserve train classifier|denoiser`: runs what `models/train_args.py` parses.

The training itself lives in `normserve.models.training` (configs, optimizers and schedules, the run
folder's checkpoint and resume, curves, distillation, the shared epoch loop, and one module per
model); `train_classifier` and `train_denoiser` are the two entry points, `run_train` the CLI's.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable
from typing import Any

from normserve.models.train_args import build_parser
from normserve.models.training.classifier import train_classifier
from normserve.models.training.config import ClassifierTrainConfig, DenoiserTrainConfig, TrainConfig
from normserve.models.training.denoiser import train_denoiser

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
