"""Choose the classical baselines' free parameters on CBSD432 *training* images, never on CBSD68.

    python scripts/tune_baselines.py [--data ../shared/data/denoise/train/CBSD432]

Grid search on PSNR over four 256x256 centre crops (every 108th training image), sigma 15/25/50,
noise seed 1: OpenCV NLM's h (as a multiple of sigma, hColor = h or h/2) and TV-Chambolle's
weight. Prints the optimum next to the rule evaluation/baselines.py uses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage.restoration import denoise_tv_chambolle

from normserve.evaluation.baselines import nlm_h, tv_weight
from normserve.quality import psnr


def nlm_psnr(noisy: list[np.ndarray], clean: list[np.ndarray], h: float, color: float) -> float:
    """Mean PSNR of OpenCV NLM (h, hColor = color * h) on uint8 RGB images."""
    outs = [
        cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(u[..., ::-1]), None, h, h * color, 7, 21) for u in noisy
    ]
    return float(np.mean([psnr(o[..., ::-1] / 255.0, c) for o, c in zip(outs, clean, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/denoise/train/CBSD432"))
    args = parser.parse_args()
    cv2.setNumThreads(2)
    crops = []
    for f in sorted(args.data.glob("*.jpg"))[::108][:4]:
        a = np.asarray(Image.open(f).convert("RGB")).astype(np.float64) / 255.0
        h, w = a.shape[:2]
        crops.append(a[h // 2 - 128 : h // 2 + 128, w // 2 - 128 : w // 2 + 128])
    for sigma in (15.0, 25.0, 50.0):
        rng = np.random.default_rng(1)
        noisy = [c + rng.normal(0, sigma / 255.0, c.shape) for c in crops]
        u8 = [np.clip(np.rint(n * 255), 0, 255).astype(np.uint8) for n in noisy]

        nlm_grid = {
            (f, c): nlm_psnr(u8, crops, sigma * f, c) for f in (0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2) for c in (0.5, 1.0)
        }
        best = max(nlm_grid, key=lambda k: nlm_grid[k])
        print(
            f"sigma {sigma:g}: NLM best h = {best[0]} sigma, hColor = {best[1]} h ({nlm_grid[best]:.2f} dB); "
            f"rule h = {nlm_h(sigma):g} ({nlm_psnr(u8, crops, nlm_h(sigma), 1.0):.2f} dB)"
        )
        tv_grid = {
            w: float(
                np.mean(
                    [
                        psnr(denoise_tv_chambolle(n, weight=w, channel_axis=-1), c)
                        for n, c in zip(noisy, crops, strict=True)
                    ]
                )
            )
            for w in (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25)
        }
        w_best = max(tv_grid, key=lambda k: tv_grid[k])
        print(
            f"sigma {sigma:g}: TV best weight = {w_best} ({tv_grid[w_best]:.2f} dB); rule weight = {tv_weight(sigma):g}"
        )


if __name__ == "__main__":
    main()
