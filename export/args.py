"""Arguments of `normserve export`, importable without torch so `normserve --help` stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path

TTA_MODES = ("none", "flip", "flip-translate")  # test-time augmentation inside a classifier's graph


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="all", help="model kind: gncnn, in_autoencoder or all (default)")
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="model repository folder")
    p.add_argument("--config", type=Path, help="model spec JSON (default: the shipped one)")
    p.add_argument("--weights", type=Path, help="safetensors weights (default: the shipped ones)")
    p.add_argument("--random-init", action="store_true", help="export freshly initialised weights (marked untrained)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    p.add_argument("--labels", type=Path, help="class labels: JSON list or one per line (classifier)")
    p.add_argument("--name", help="served model name (default: the kind)")
    p.add_argument("--version", help="version folder (default: next integer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version folder")
    p.add_argument(
        "--int8",
        metavar="DATA",
        help="classifier: serve an int8 graph, calibrated on training images of this CIFAR-10 source "
        "(what `normserve train classifier --data` takes) and checked against fp32 on others",
    )
    p.add_argument(
        "--tta",
        choices=TTA_MODES,
        default="none",
        help="classifier: test-time augmentation inside the graph; flip = mean of the logits of the "
        "image and its mirror image (twice the compute)",
    )
    p.add_argument("--calibration-images", type=int, default=512, help="--int8: images to calibrate on")
    p.add_argument("--check-images", type=int, default=2000, help="--int8: held-out images to check agreement on")
    p.add_argument(
        "--verify", action="store_true", help="check the repository's newest versions against the shipped weights"
    )
