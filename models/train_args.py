"""`normserve train classifier|denoiser`: the arguments, torch-free, so that `--help` works without
the export/train extras. `models.train` runs what they describe; unset options keep each task's
defaults (its config dataclass)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TASKS = ("classifier", "denoiser")
# The names of models.training.optim's optimizer and schedule tables (a test checks they agree).
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")


def parse_model_overrides(value: str) -> dict[str, Any]:
    """`--model` takes inline JSON or a path to a JSON file (a bare config or a {kind, config} spec)."""
    try:
        text = Path(value).read_text() if not value.lstrip().startswith("{") else value
        data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"--model takes a JSON object or a JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError("--model must be a JSON object")
    return data["config"] if "config" in data and "kind" in data else data


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run folder (checkpoint, metrics, curve, weights)")
    parser.add_argument(
        "--model",
        type=parse_model_overrides,
        help="model config overrides (JSON or a JSON file) on top of the served architecture, "
        "models/configs/<kind>.json",
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--optimizer", choices=OPTIMIZERS)
    parser.add_argument("--schedule", choices=SCHEDULES)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--bf16", action="store_true", default=None, help="CPU bfloat16 autocast")
    parser.add_argument("--max-steps-per-epoch", type=int, help="cap steps per epoch (timing runs)")
    parser.add_argument("--init-from", help="start from these safetensors weights (fine-tune / warm restart)")
    parser.add_argument(
        "--average-from",
        type=int,
        help="write the mean of the weights after epochs N..epochs instead of the last (SWA; 0 = off)",
    )
    parser.add_argument("--resume", action="store_true", default=None, help="continue from OUT/checkpoint.pt")
    parser.add_argument("--stop-after", type=int, help="leave after N epochs of this invocation (resume later)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _classifier(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        help="a folder or zip of train/<class>/ and test/<class>/ images (any size; resized to 32x32), "
        "or CIFAR-10's python batches",
    )
    _common(parser)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--cutout", type=int, help="cutout square side in pixels (0 = off)")
    parser.add_argument("--cache-dir", help="where decoded training arrays are cached")
    parser.add_argument(
        "--teacher",
        dest="teachers",
        action="append",
        help="distil from this trained run folder (repeat for an ensemble: their mean logits)",
    )
    parser.add_argument("--kd-alpha", type=float, help="weight of the distillation term (default 0.9)")
    parser.add_argument("--kd-temperature", type=float, help="distillation temperature (default 4)")


def _denoiser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="folder of clean training images (e.g. CBSD432)")
    parser.add_argument("--test-data", help="folder of clean test images (e.g. CBSD68)")
    _common(parser)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--patches-per-epoch", type=int)
    parser.add_argument("--sigma-max", type=float, help="training noise sigma ~ U[0, sigma_max] (0-255 scale)")
    parser.add_argument(
        "--clip-fraction",
        type=float,
        help="share of training patches clipped to [0, 1] and rounded to 8 bits after the noise, "
        "as a client's PNG (default 0: unclipped float noise only)",
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """`classifier` and `denoiser` subcommands, each with its own options (and its own `--help`)."""
    sub = parser.add_subparsers(dest="task", required=True, metavar="{classifier,denoiser}")
    _classifier(sub.add_parser("classifier", help="the GNCNN image classifier"))
    _denoiser(sub.add_parser("denoiser", help="the InstanceNorm autoencoder denoiser"))


def build_parser(prog: str = "normserve train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train a model: classifier | denoiser.")
    add_train_arguments(parser)
    return parser
