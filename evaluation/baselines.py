"""Classical denoisers run beside the served model on the same noisy images (`--baselines`).

Each gets the true noise level. Parameters that need choosing were tuned on four 256x256 crops
of CBSD432 *training* images (never on CBSD68), sigma 15/25/50, grid search on PSNR
(`python scripts/tune_baselines.py` reproduces the search):

* OpenCV `fastNlMeansDenoisingColored` (Buades et al.; 7x7 patches, 21x21 search):
  h = hColor = 0.6 sigma for sigma <= 30, 0.5 sigma above (0-255 scale). It only takes 8-bit
  images, so it always sees the uint8 version of the noisy image (clipped and rounded), in both
  protocols.
* scikit-image `denoise_wavelet`: BayesShrink, soft thresholding, YCbCr, sigma given and
  rescaled (`rescale_sigma=True`); nothing tuned.
* scikit-image `denoise_tv_chambolle`: weight = 0.003 sigma (0.045 / 0.075 / 0.15; tuned optima
  0.04 / 0.08 / 0.15).
* CBM3D (`bm3d.bm3d_rgb(noisy, sigma_psd=sigma/255)`, Dabov et al. 2007, implementation by
  Mäkinen, Azzari and Foi, Tampere University): slow (tens of seconds an image), so it runs on
  the float protocol and on the first `--bm3d-limit` images. Its licence is non-commercial, so
  it is not part of the `eval` extra; install it yourself (`pip install bm3d`) to include it.

Every library is imported lazily: without `--baselines` none is needed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Denoise = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


@dataclass(frozen=True)
class Baseline:
    name: str  # short key in results ("opencv_nlm")
    title: str  # for tables
    run: Denoise  # (noisy float HWC in [0,1] scale, noisy uint8 HWC, sigma 0-255) -> float HWC
    params: Callable[[float], dict[str, Any]]  # the parameters used at a sigma, for the JSON
    protocols: tuple[str, ...] = ("float", "uint8")
    limit: int = 0  # first N images only (0 = all)
    notes: list[str] = field(default_factory=list)


def nlm_h(sigma: float) -> float:
    return (0.6 if sigma <= 30 else 0.5) * sigma


def tv_weight(sigma: float) -> float:
    return 0.003 * sigma


def _opencv(threads: int) -> Baseline:
    import cv2

    cv2.setNumThreads(threads)

    def run(noisy: np.ndarray, noisy_u8: np.ndarray, sigma: float) -> np.ndarray:
        h = nlm_h(sigma)
        bgr = np.ascontiguousarray(noisy_u8[..., ::-1])  # OpenCV's colour conversions expect BGR
        out = cv2.fastNlMeansDenoisingColored(bgr, None, h, h, 7, 21)
        return np.asarray(out[..., ::-1], dtype=np.float64) / 255.0

    return Baseline(
        "opencv_nlm",
        "OpenCV fastNlMeansDenoisingColored",
        run,
        lambda s: {"h": nlm_h(s), "hColor": nlm_h(s), "templateWindowSize": 7, "searchWindowSize": 21},
        notes=["takes uint8 only: sees the clipped, rounded noisy image in both protocols"],
    )


def _wavelet() -> Baseline:
    from skimage.restoration import denoise_wavelet

    def run(noisy: np.ndarray, noisy_u8: np.ndarray, sigma: float) -> np.ndarray:
        return np.asarray(
            denoise_wavelet(
                noisy.astype(np.float64),
                sigma=sigma / 255.0,
                channel_axis=-1,
                convert2ycbcr=True,
                method="BayesShrink",
                mode="soft",
                rescale_sigma=True,
            )
        )

    params = {"method": "BayesShrink", "mode": "soft", "convert2ycbcr": True, "rescale_sigma": True}
    return Baseline("skimage_wavelet", "scikit-image denoise_wavelet", run, lambda s: {**params, "sigma": s / 255.0})


def _tv() -> Baseline:
    from skimage.restoration import denoise_tv_chambolle

    def run(noisy: np.ndarray, noisy_u8: np.ndarray, sigma: float) -> np.ndarray:
        return np.asarray(denoise_tv_chambolle(noisy.astype(np.float64), weight=tv_weight(sigma), channel_axis=-1))

    return Baseline("skimage_tv", "scikit-image denoise_tv_chambolle", run, lambda s: {"weight": tv_weight(s)})


def _bm3d(limit: int) -> Baseline:
    import bm3d

    def run(noisy: np.ndarray, noisy_u8: np.ndarray, sigma: float) -> np.ndarray:
        return np.asarray(bm3d.bm3d_rgb(noisy.astype(np.float64), sigma_psd=sigma / 255.0))

    return Baseline(
        "bm3d",
        "CBM3D (bm3d package)",
        run,
        lambda s: {"sigma_psd": s / 255.0, "profile": "np", "colorspace": "opp"},
        protocols=("float",),
        limit=limit,
        notes=[
            'float protocol only (slow). K. Dabov, A. Foi, V. Katkovnik, K. Egiazarian, "Color image denoising via '
            'sparse 3D collaborative filtering with grouping constraint in luminance-chrominance space", ICIP 2007; '
            "implementation: Y. Mäkinen, L. Azzari, A. Foi, Tampere University (bm3d package, non-commercial licence)."
        ],
    )


METHODS = ("opencv_nlm", "skimage_wavelet", "skimage_tv", "bm3d")


def load_baselines(methods: list[str], threads: int, bm3d_limit: int) -> tuple[list[Baseline], list[str]]:
    """The asked-for baselines that can run here, and notes on those that cannot."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; known: {list(METHODS)}")
    needs = {"opencv_nlm": "cv2", "skimage_wavelet": "skimage", "skimage_tv": "skimage"}
    missing = sorted({needs[m] for m in methods if m in needs and importlib.util.find_spec(needs[m]) is None})
    if missing:
        raise ModuleNotFoundError(
            f"--baselines needs {missing}: pip install 'normserve[eval]' (opencv-python-headless, scikit-image)"
        )
    builders: dict[str, Callable[[], Baseline]] = {
        "opencv_nlm": lambda: _opencv(threads),
        "skimage_wavelet": _wavelet,
        "skimage_tv": _tv,
        "bm3d": lambda: _bm3d(bm3d_limit),
    }
    baselines, notes = [], []
    for m in methods:
        if m == "bm3d" and importlib.util.find_spec("bm3d") is None:
            notes.append("BM3D skipped: the bm3d package is not installed (pip install bm3d; non-commercial licence)")
            continue
        baselines.append(builders[m]())
    return baselines, notes
