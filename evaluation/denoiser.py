"""`normserve eval denoiser`: PSNR/SSIM of the served denoiser on CBSD68 through ONNX Runtime.

Noise: for every (image, sigma) an own generator seeded from (seed, sigma, image name), so each
method (and every rerun) sees the same noisy image whatever the image order or `--limit`.
Two protocols share that noise draw:

* float: clean/255 + N(0, sigma/255), not clipped, fed to the graph as is (the papers' protocol);
* uint8: round(clean + 255 * noise) clipped to [0, 255] as uint8, then the service's `to_tensor`
  (x/255), which is what a client sending the noisy image as a PNG gets.

Metrics, against the clean image as uint8/255: the output clipped to [0, 1] in float, then
PSNR = 10 log10(1 / MSE) over all RGB values (`psnr`, the headline), the same after rounding the
output to uint8 like the PNG `/reconstruct` returns (`psnr_png`), and SSIM from
`skimage.metrics.structural_similarity(channel_axis=-1, data_range=1, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)` (Wang et al.'s settings), averaged over the channels.
The noisy input's PSNR is of the input as fed (unclipped in the float protocol).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normserve.evaluation.baselines import Baseline
from normserve.evaluation.datasets import read_image
from normserve.evaluation.runtime import EvaluationError, model_facts, time_calls
from normserve.quality import psnr
from normserve.service.imaging import DecodedImage, to_tensor, to_uint8_image
from normserve.service.model import ServedModel
from normserve.service.tasks import DenoisingTask, task_of

log = logging.getLogger("normserve.eval")

PROTOCOLS = ("float", "uint8")
MODEL = "normserve"  # the served model's method key in the results
OTHER = "compare"  # --compare's version
NOISY = "noisy"
LATENCY_SIGMA = 25.0
GRID_CROP = 192


# --------------------------------------------------------------------------- noise and metrics


def gaussian_noise(shape: tuple[int, ...], sigma: float, seed: int, key: str) -> np.ndarray:
    """N(0, sigma/255) noise (float64, [0, 1] scale) for one (image, sigma), reproducible from seed."""
    entropy = [seed, round(sigma * 1000), zlib.crc32(key.encode())]
    return np.random.default_rng(np.random.SeedSequence(entropy)).standard_normal(shape) * (sigma / 255.0)


def noisy_float(clean_u8: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Float protocol: clean/255 + noise, not clipped (float32 HWC)."""
    return (clean_u8.astype(np.float64) / 255.0 + noise).astype(np.float32)


def noisy_uint8(clean_u8: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """uint8 protocol: the noisy image clipped to [0, 255] and rounded, as a PNG would hold it."""
    return np.clip(np.rint(clean_u8.astype(np.float64) + 255.0 * noise), 0, 255).astype(np.uint8)


def ssim(x: np.ndarray, ref: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(
        structural_similarity(
            np.asarray(ref, np.float64),
            np.asarray(x, np.float64),
            channel_axis=-1,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def run_model(model: ServedModel, hwc: np.ndarray) -> np.ndarray:
    """The model's raw output (H, W, 3) float for one float HWC image, through the denoising task
    /reconstruct runs (service/tasks.py: whole, or tiled as the server tiles an image larger than
    NORMSERVE_RECONSTRUCT_TILE)."""
    return task_of(model, DenoisingTask).denoise(np.asarray(hwc, np.float32))


def model_input(clean_u8: np.ndarray, noise: np.ndarray, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(float HWC the graph gets, uint8 noisy image) for a protocol; both from the same noise."""
    u8 = noisy_uint8(clean_u8, noise)
    if protocol == "float":
        return noisy_float(clean_u8, noise), u8
    if protocol == "uint8":
        return to_tensor(DecodedImage(u8, "PNG"))[0].transpose(1, 2, 0), u8  # exactly the service's x/255
    raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")


# --------------------------------------------------------------------------- evaluation


@dataclass
class Record:
    method: str
    protocol: str
    sigma: float
    image: str
    psnr: float
    ssim: float
    seconds: float
    psnr_png: float | None = None


def _score(
    method: str, protocol: str, sigma: float, image: str, out: np.ndarray, clean: np.ndarray, seconds: float
) -> Record:
    out = np.clip(out, 0.0, 1.0)
    return Record(method, protocol, sigma, image, psnr(out, clean), ssim(out, clean), seconds)


def evaluate_images(
    model: ServedModel,
    files: list[Path],
    sigmas: list[float],
    seed: int,
    baselines: list[Baseline],
    baselines_limit: int,
    other: ServedModel | None = None,
) -> list[Record]:
    """Every (image, sigma, protocol) through the model and, when asked, the baselines and another
    version of the model (`other`, recorded as method `OTHER`)."""
    records: list[Record] = []
    for idx, path in enumerate(files):
        clean_u8 = read_image(path).pixels
        clean = clean_u8.astype(np.float64) / 255.0
        for sigma in sigmas:
            noise = gaussian_noise(clean_u8.shape, sigma, seed, path.name)
            for protocol in PROTOCOLS:
                x, u8 = model_input(clean_u8, noise, protocol)
                records.append(Record(NOISY, protocol, sigma, path.name, psnr(x, clean), ssim(x, clean), 0.0))
                start = time.perf_counter()
                out = run_model(model, x)
                seconds = time.perf_counter() - start
                rec = _score(MODEL, protocol, sigma, path.name, out, clean, seconds)
                rec.psnr_png = psnr(to_uint8_image(out.transpose(2, 0, 1)).astype(np.float64) / 255.0, clean)
                records.append(rec)
                if other is not None:
                    start = time.perf_counter()
                    y = run_model(other, x)
                    records.append(_score(OTHER, protocol, sigma, path.name, y, clean, time.perf_counter() - start))
                for b in baselines:
                    limit = min(n for n in (b.limit, baselines_limit, len(files)) if n > 0)
                    if protocol not in b.protocols or idx >= limit:
                        continue
                    start = time.perf_counter()
                    y = b.run(x, u8, sigma)
                    records.append(_score(b.name, protocol, sigma, path.name, y, clean, time.perf_counter() - start))
        done = [r for r in records if r.image == path.name and r.method == MODEL and r.protocol == "float"]
        log.info(
            "%d/%d %s: %s",
            idx + 1,
            len(files),
            path.name,
            ", ".join(f"sigma {r.sigma:g} {r.psnr:.2f} dB" for r in done),
        )
    return records


def summarise(records: list[Record]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """{protocol: {sigma: {method: {psnr, ssim, seconds, images, [model_psnr/ssim on the same images]}}}}."""
    groups: dict[tuple[str, float, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.protocol, r.sigma, r.method)].append(r)
    model_by_image = {(r.protocol, r.sigma, r.image): r for r in records if r.method == MODEL}
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for (protocol, sigma, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        entry: dict[str, Any] = {
            "psnr": float(np.mean([r.psnr for r in rs])),
            "ssim": float(np.mean([r.ssim for r in rs])),
            "seconds_per_image": float(np.mean([r.seconds for r in rs])),
            "images": len(rs),
        }
        if method == MODEL:
            entry["psnr_png"] = float(np.mean([r.psnr_png for r in rs if r.psnr_png is not None]))
        else:
            same = [model_by_image[(protocol, sigma, r.image)] for r in rs]
            entry["model_psnr_same_images"] = float(np.mean([r.psnr for r in same]))
            entry["model_ssim_same_images"] = float(np.mean([r.ssim for r in same]))
        out.setdefault(protocol, {}).setdefault(f"{sigma:g}", {})[method] = entry
    return out


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (zero differences dropped, as
    Wilcoxon did); 1.0 when every difference is zero."""
    from scipy.stats import wilcoxon

    if not np.any(differences):
        return 1.0
    return float(wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


def comparison(other: ServedModel, records: list[Record]) -> dict[str, Any]:
    """The model against `other` (its records are method `OTHER`) image by image: which artifact,
    and {protocol: {sigma: {images, psnr, other_psnr, mean_difference_db, this_better,
    other_better, ties, wilcoxon_p, ssim, other_ssim}}} under "protocols"."""
    theirs = {(r.protocol, r.sigma, r.image): r for r in records if r.method == OTHER}
    pairs: dict[tuple[str, float], list[tuple[Record, Record]]] = defaultdict(list)
    for r in records:
        if r.method == MODEL and (r.protocol, r.sigma, r.image) in theirs:
            pairs[(r.protocol, r.sigma)].append((r, theirs[(r.protocol, r.sigma, r.image)]))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (protocol, sigma), ps in sorted(pairs.items()):
        diff = np.array([a.psnr - b.psnr for a, b in ps])
        out.setdefault(protocol, {})[f"{sigma:g}"] = {
            "images": len(ps),
            "psnr": float(np.mean([a.psnr for a, _ in ps])),
            "other_psnr": float(np.mean([b.psnr for _, b in ps])),
            "mean_difference_db": float(diff.mean()),
            "this_better": int((diff > 0).sum()),
            "other_better": int((diff < 0).sum()),
            "ties": int((diff == 0).sum()),
            "wilcoxon_p": wilcoxon_p(diff),
            "ssim": float(np.mean([a.ssim for a, _ in ps])),
            "other_ssim": float(np.mean([b.ssim for _, b in ps])),
        }
    return {
        "other": other.key,
        "model": model_facts(other),  # which artifact it was compared with
        "test": "Wilcoxon signed-rank, two-sided, on the per-image PSNR differences (this - other)",
        "protocols": out,
    }


def latency(model: ServedModel, first: Path, seed: int, runs: int, side: int = 512) -> dict[str, Any]:
    """ORT time for one side x side image: a real image resized (service's bilinear) plus sigma-25 noise."""
    img = to_tensor(read_image(first), (side, side))[0].transpose(1, 2, 0)
    noise = gaussian_noise(img.shape, LATENCY_SIGMA, seed, "latency")
    x = (img + noise).astype(np.float32)
    timing = time_calls(lambda: run_model(model, x), runs)
    return {"input_hw": [side, side], "source": first.name, **timing}


@dataclass
class GridRow:
    image: str
    noisy: np.ndarray  # uint8 HWC crops for display
    denoised: np.ndarray
    clean: np.ndarray
    noisy_psnr: float
    denoised_psnr: float


def _crop(a: np.ndarray, side: int) -> np.ndarray:
    h, w = a.shape[:2]
    s = min(side, h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return a[y : y + s, x : x + s]


def grid_rows(model: ServedModel, files: list[Path], sigma: float, seed: int) -> list[GridRow]:
    """Noisy | denoised | clean centre crops (float protocol); PSNR of the whole image."""
    rows = []
    for path in files:
        clean_u8 = read_image(path).pixels
        clean = clean_u8.astype(np.float64) / 255.0
        x, _ = model_input(clean_u8, gaussian_noise(clean_u8.shape, sigma, seed, path.name), "float")
        out = np.clip(run_model(model, x), 0.0, 1.0)
        rows.append(
            GridRow(
                path.name,
                _crop(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8), GRID_CROP),
                _crop(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8), GRID_CROP),
                _crop(clean_u8, GRID_CROP),
                psnr(x, clean),
                psnr(out, clean),
            )
        )
    return rows


def pick_grid_files(files: list[Path], names: str) -> list[Path]:
    """The named images (comma list), or three spread over `files`."""
    if names.strip():
        by_name = {p.name: p for p in files} | {p.stem: p for p in files}
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise EvaluationError(f"--grid-images {unknown} are not among the evaluated images")
        return [by_name[n] for n in wanted]
    picks = sorted({0, len(files) // 2, len(files) - 1})
    return [files[i] for i in picks]
