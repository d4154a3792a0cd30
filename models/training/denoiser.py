"""Training the InstanceNorm denoiser on random noisy patches of clean images."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normserve.models.autoencoder import AutoEncoderConfig, SimpleIN_AutoEncoder
from normserve.models.data import NoisyPatchSampler, add_eval_noise, list_images, load_image_folder, load_rgb
from normserve.models.training.config import DenoiserTrainConfig, shipped_config
from normserve.models.training.loop import TrainingTask, fit
from normserve.quality import psnr


def evaluate_denoiser(
    model: nn.Module, folder: str | Path, sigma: float = 25.0, seed: int = 0, limit: int = 0
) -> dict[str, float]:
    """Mean PSNR (dB, RGB, peak 1) over the images of `folder`, float protocol: clean/255 plus
    N(0, sigma/255) noise from one fixed-seed generator in sorted file order, not clipped."""
    rng = np.random.default_rng(seed)
    files = list_images(folder)
    if limit > 0:
        files = files[:limit]
    noisy_psnr, out_psnr = [], []
    for path in files:
        clean = load_rgb(path).astype(np.float32) / 255.0
        noisy = add_eval_noise(clean, sigma, rng)
        x = torch.from_numpy(noisy).permute(2, 0, 1)[None]
        y = model(x)[0].permute(1, 2, 0).clamp(0, 1).numpy()
        noisy_psnr.append(psnr(noisy, clean))
        out_psnr.append(psnr(y, clean))
    tag = f"{sigma:g}"
    return {f"psnr_sigma{tag}": float(np.mean(out_psnr)), f"noisy_psnr_sigma{tag}": float(np.mean(noisy_psnr))}


def build_denoiser(overrides: dict[str, Any]) -> SimpleIN_AutoEncoder:
    """The served denoiser's architecture (models/configs/in_autoencoder.json) with `overrides` on top."""
    try:
        return SimpleIN_AutoEncoder(AutoEncoderConfig.from_dict({**shipped_config("in_autoencoder"), **overrides}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--model {json.dumps(overrides)}: not a valid in_autoencoder config ({exc})") from None


def _batch_psnr(pred: torch.Tensor, clean: torch.Tensor) -> float:
    mse = ((pred.clamp(0, 1) - clean) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def train_denoiser(cfg: DenoiserTrainConfig) -> dict[str, Any]:
    """Train the IN autoencoder on random noisy patches of the clean images in `cfg.data`."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    sampler = NoisyPatchSampler(load_image_folder(cfg.data), cfg.patch_size, cfg.sigma_max, cfg.clip_fraction)
    model = build_denoiser(cfg.model)
    steps = max(1, cfg.patches_per_epoch // cfg.batch_size)

    def batches(gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(steps):
            yield sampler.batch(cfg.batch_size, gen)

    def evaluate(m: nn.Module, final: bool) -> dict[str, float]:
        if not cfg.test_data:
            return {}
        return evaluate_denoiser(m, cfg.test_data, cfg.eval_sigma, cfg.eval_seed, cfg.eval_limit)

    task = TrainingTask(
        kind="in_autoencoder",
        model=model,
        steps_per_epoch=steps,
        train_batches=batches,
        loss_fn=lambda pred, clean, _noisy: F.mse_loss(pred, clean),
        train_metric=_batch_psnr,
        train_metric_name="psnr",
        evaluate=evaluate,
        main_metric=f"psnr_sigma{cfg.eval_sigma:g}",
    )
    return fit(task, cfg)
