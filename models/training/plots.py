"""`curve.png`: a run's training curves (matplotlib, Agg backend; optional)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from normserve.models.training.run_folder import CURVE

log = logging.getLogger(__name__)


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
