"""`normserve.quality.psnr`, the one PSNR that training (`models`), evaluation and the scripts share.
It replaced three copies that agreed to the bit on float images (peak 1, float64 arithmetic, `inf`
for identical images) and one with peak 255 for uint8 images; these pin that behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normserve.quality import psnr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unit_scale_images_use_peak_one_in_float64(dtype: type[np.floating]) -> None:
    rng = np.random.default_rng(0)
    clean = rng.random((16, 16, 3)).astype(dtype)
    noisy = np.clip(clean + rng.normal(0.0, 0.05, clean.shape), 0.0, 1.0).astype(dtype)
    mse = np.mean((noisy.astype(np.float64) - clean.astype(np.float64)) ** 2)
    assert psnr(noisy, clean) == pytest.approx(10.0 * math.log10(1.0 / mse), rel=1e-12)
    assert psnr(np.full((4, 4, 3), 0.6, dtype), np.full((4, 4, 3), 0.5, dtype)) == pytest.approx(20.0, abs=1e-5)


def test_uint8_images_with_peak_255_do_not_wrap_and_match_the_unit_scale() -> None:
    a, b = np.array([[0, 255]], np.uint8), np.array([[10, 245]], np.uint8)  # uint8 0 - 10 would wrap to 246
    assert psnr(a, b, peak=255.0) == pytest.approx(10.0 * math.log10(255.0**2 / 100.0))
    rng = np.random.default_rng(1)
    x, ref = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert psnr(x, ref, peak=255.0) == pytest.approx(psnr(x / 255.0, ref / 255.0), rel=1e-12)


@pytest.mark.parametrize("image", [np.zeros((3, 3), np.uint8), np.full((2, 2, 3), 0.25, np.float32), [[0.5]]])
def test_identical_images_are_infinitely_close(image: np.ndarray) -> None:
    assert psnr(image, image) == math.inf
    assert psnr(image, image, peak=255.0) == math.inf
