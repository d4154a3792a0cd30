"""Arguments of `normserve eval classifier|denoiser`: argparse only, so `normserve --help` stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path

SHARED_DATA = Path("../shared/data")
DEFAULT_CIFAR = SHARED_DATA / "cifar-10-jpeg" / "CIFAR-10-images.zip"
DEFAULT_CIFAR_NPZ = SHARED_DATA / "cifar-10-jpeg" / "cifar10_canonical_labels_and_test_prefix.npz"
DEFAULT_CBSD68 = SHARED_DATA / "denoise" / "test" / "CBSD68"


def _sigmas(value: str) -> list[float]:
    try:
        sigmas = [float(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sigmas takes a comma list of numbers, got {value!r}") from None
    if not sigmas or any(s <= 0 for s in sigmas):
        raise argparse.ArgumentTypeError(f"--sigmas needs positive noise levels, got {value!r}")
    return sigmas


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return n


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return n


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="model repository folder")
    p.add_argument("--version", help="model version (default: the newest)")
    p.add_argument(
        "--out", type=Path, help="folder for the JSON, Markdown and PNG results (default: runs/eval/<model>-v<version>)"
    )
    p.add_argument(
        "--publish",
        type=Path,
        metavar="DIR",
        help="also copy the Markdown table, JSON and PNGs into DIR (e.g. docs/eval, for the README)",
    )
    p.add_argument("--threads", type=_positive, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="ONNX Runtime execution providers, as NORMSERVE_PROVIDERS (default: CPUExecutionProvider)",
    )
    p.add_argument("--limit", type=_non_negative, default=0, help="evaluate only the first N images (0 = all)")
    p.add_argument("--latency-runs", type=_positive, default=20, help="timed runs for the latency figure (median)")
    p.add_argument(
        "--compare",
        metavar="VERSION",
        help="also score this version of the model on the same test images and test the difference image by "
        "image (classifier: the images only one of the two gets right, McNemar's exact p; denoiser: per-image "
        "PSNR differences, Wilcoxon signed-rank p)",
    )
    p.add_argument(
        "--compare-repository",
        type=Path,
        help="the repository holding --compare's version (default: --repository)",
    )
    p.add_argument(
        "--update-config",
        action="store_true",
        help="write the headline metrics into the version's config.json under 'metrics'",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`classifier` and `denoiser` sub-commands with their options."""
    sub = parser.add_subparsers(dest="task", required=True, metavar="{classifier,denoiser}")

    cls = sub.add_parser("classifier", help="top-1 on CIFAR-10 test (JPEG) and the lossless canonical prefix")
    cls.add_argument("--model", default="gncnn", help="model name in the repository (default gncnn)")
    cls.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_CIFAR,
        help=f"CIFAR-10: zip or folder of test/<class>/*.jpg, or canonical batches (default {DEFAULT_CIFAR})",
    )
    cls.add_argument(
        "--npz",
        type=Path,
        help=f"canonical labels + lossless test prefix .npz (default {DEFAULT_CIFAR_NPZ} when it exists)",
    )
    cls.add_argument("--no-npz", action="store_true", help="skip the lossless canonical prefix")
    cls.add_argument("--batch-size", type=_positive, default=256, help="images per ONNX Runtime call (default 256)")
    _common(cls)

    den = sub.add_parser("denoiser", help="PSNR/SSIM on CBSD68 at several noise levels, latency, baselines")
    den.add_argument("--model", default="in_autoencoder", help="model name in the repository (default in_autoencoder)")
    den.add_argument(
        "--data", type=Path, default=DEFAULT_CBSD68, help=f"folder of clean test images (default {DEFAULT_CBSD68})"
    )
    den.add_argument("--sigmas", type=_sigmas, default=[15.0, 25.0, 50.0], help="noise levels on the 0-255 scale")
    den.add_argument("--seed", type=int, default=0, help="noise seed; each (image, sigma) gets its own stream")
    den.add_argument(
        "--baselines",
        action="store_true",
        help="also run the noisy input, OpenCV NLM, skimage wavelet and TV, and BM3D on the same noisy images",
    )
    den.add_argument(
        "--baseline-methods",
        type=lambda v: [m.strip() for m in v.split(",") if m.strip()],
        default=["opencv_nlm", "skimage_wavelet", "skimage_tv", "bm3d"],
        help="which baselines (default: opencv_nlm,skimage_wavelet,skimage_tv,bm3d)",
    )
    den.add_argument(
        "--baselines-limit", type=_non_negative, default=0, help="run the baselines on the first N images only"
    )
    den.add_argument(
        "--bm3d-limit",
        type=_non_negative,
        default=10,
        help="run BM3D on the first N images only (0 = all; about 18 s per image and sigma on 2 idle cores), default 10",
    )
    den.add_argument(
        "--grid-images",
        default="",
        help="comma list of image names for the picture grid (default: three spread over the sorted set)",
    )
    den.add_argument(
        "--latency-size", type=_positive, default=512, help="side of the square image timed for latency (default 512)"
    )
    den.add_argument("--grid-sigma", type=float, default=25.0, help="noise level of the picture grid (default 25)")
    _common(den)
