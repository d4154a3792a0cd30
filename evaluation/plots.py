"""The pictures: the classifier's confusion matrix and the denoiser's noisy | denoised | clean grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from normserve.evaluation.denoiser import GridRow


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def confusion_png(path: Path, confusion: np.ndarray, labels: Sequence[str], title: str) -> Path:
    """Row-normalised confusion matrix (rows: true class) with the counts written in each cell."""
    plt = _pyplot()
    totals = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, totals, out=np.zeros(confusion.shape, np.float64), where=totals > 0)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * n, 0.6 + 0.6 * n), dpi=110)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    for i in range(n):
        for j in range(n):
            if confusion[i, j]:
                ax.text(
                    j,
                    i,
                    str(confusion[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def grid_png(path: Path, rows: Sequence[GridRow], title: str) -> Path:
    """One row per image: noisy | denoised | clean crops, PSNR (whole image) in the titles."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3.1 * len(rows)), dpi=100, squeeze=False)
    for ax_row, row in zip(axes, rows, strict=True):
        panels = [
            (row.noisy, f"noisy {row.noisy_psnr:.2f} dB"),
            (row.denoised, f"denoised {row.denoised_psnr:.2f} dB"),
            (row.clean, f"clean ({row.image})"),
        ]
        for ax, (pixels, caption) in zip(ax_row, panels, strict=True):
            ax.imshow(pixels, interpolation="nearest")
            ax.set_title(caption, fontsize=10)
            ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
