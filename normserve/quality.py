"""Image quality measures shared by training, evaluation and the scripts (numpy only; imports
nothing of normserve, so every part may use it)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def psnr(x: ArrayLike, ref: ArrayLike, peak: float = 1.0) -> float:
    """PSNR in dB of `x` against `ref` over every value, computed in float64 (so uint8 inputs do
    not wrap); `peak` is the largest possible value: 1 for images on the [0, 1] scale, 255 for
    uint8. Identical inputs give `inf`."""
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return math.inf if mse == 0 else float(10.0 * np.log10(peak * peak / mse))
