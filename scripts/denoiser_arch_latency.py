"""How fast would a larger denoiser run? ORT CPU latency of one --side x --side image for several
`in_autoencoder` candidates next to the served architecture (models/configs/in_autoencoder.json),
interleaved in one process so the ratios hold on a noisy machine. Needs the export extra.

    python -m scripts.denoiser_arch_latency                     # the default candidates, 512x512, 2 threads
    python -m scripts.denoiser_arch_latency --model '{"base": 48}' --model models/configs/in_autoencoder_v4.json

--model takes what `normserve train denoiser --model` takes (JSON overrides or a config file) and
applies it the same way, on top of the served config. Weights are random (latency does not depend
on them, and the residual projection is drawn non-zero so no branch of the graph is constant);
each candidate is exported exactly as `normserve export` does (`export_onnx`: opset 18, dynamic
size) and run in a session optimised as the service's. Multiply-adds at --side x --side are
counted by torch's FlopCounterMode (FLOPs / 2); parameters are counted from the model.

`--train-rounds N` also times one training step of each candidate in torch, interleaved the same
way: `normserve train denoiser`'s step (forward, MSE loss, backward, AdamW) on a random batch of
--train-batch patches of --train-patch pixels, with --threads torch threads. Seconds per epoch
are that times the steps of one epoch (3456 patches by default).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from normserve.evaluation.runtime import cpu_session, time_interleaved
from normserve.export.onnx_export import INPUT_NAME, export_onnx
from normserve.models.train_args import parse_model_overrides
from normserve.models.training.denoiser import build_denoiser

# Candidates of issue #30 (the design's family, extended where it pays), as overrides of the served config.
CANDIDATES: list[dict[str, Any]] = [
    {"base": 48},
    {"base": 40, "bottleneck_depth": 6},
    {"scales": 3},
    {"scales": 3, "base": 40},
    {"stem": 1},
    {"stem": 1, "scales": 3},
]


def measure(overrides: dict[str, Any], side: int, directory: Path, name: str) -> tuple[Path, int, float]:
    """Export the candidate to `directory`; its graph path, parameters and multiply-adds at side x side."""
    torch.manual_seed(0)
    model = build_denoiser(overrides).eval()
    with torch.no_grad():
        model.proj.weight.normal_(0, 0.01)
        params = sum(p.numel() for p in model.parameters())
        with FlopCounterMode(display=False) as counter:
            model(torch.rand(1, 3, side, side))
    path = directory / f"{name}.onnx"
    export_onnx("in_autoencoder", model, path)
    return path, params, counter.get_total_flops() / 2


def train_step(overrides: dict[str, Any], batch: int, patch: int) -> Any:
    """A callable that runs one optimizer step of the candidate on a fixed random batch."""
    torch.manual_seed(0)
    model = build_denoiser(overrides).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clean = torch.rand(batch, 3, patch, patch)
    noisy = clean + 0.1 * torch.randn_like(clean)

    def step() -> None:
        loss = F.mse_loss(model(noisy), clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.denoiser_arch_latency", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        action="append",
        type=parse_model_overrides,
        help="in_autoencoder config overrides (JSON or a JSON file); repeatable",
    )
    p.add_argument("--side", type=int, default=512, help="image side in pixels")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    p.add_argument("--rounds", type=int, default=15, help="timed runs of each graph, interleaved")
    p.add_argument("--train-rounds", type=int, default=0, help="also time this many training steps of each")
    p.add_argument("--train-batch", type=int, default=16, help="patches per training step")
    p.add_argument("--train-patch", type=int, default=96, help="training patch side")
    p.add_argument("--epoch-patches", type=int, default=3456, help="patches per epoch (seconds per epoch)")
    args = p.parse_args(argv)

    configs = [("served", {}), *((json.dumps(c, sort_keys=True), c) for c in (args.model or CANDIDATES))]
    x = np.random.default_rng(0).random((1, 3, args.side, args.side), dtype=np.float32)
    facts: dict[str, tuple[int, float]] = {}
    calls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(configs):
            path, params, macs = measure(overrides, args.side, Path(tmp), str(i))
            facts[name] = (params, macs)
            session = cpu_session(path, args.threads)
            calls[name] = partial(session.run, None, {INPUT_NAME: x})
        medians = time_interleaved(calls, args.rounds, warmup=2)
    reference = medians["served"]
    print(f"1x3x{args.side}x{args.side}, ORT CPU {args.threads} threads, median of {args.rounds} interleaved runs")
    print(f"{'config (overrides of the served one)':46s} {'params':>8s} {'MMAC':>8s} {'ms':>7s} {'x served':>8s}")
    for name, median in medians.items():
        params, macs = facts[name]
        print(f"{name:46s} {params:8d} {macs / 1e6:8.1f} {median * 1e3:7.1f} {median / reference:8.2f}")
    if args.train_rounds > 0:
        torch.set_num_threads(args.threads)
        steps = {name: train_step(overrides, args.train_batch, args.train_patch) for name, overrides in configs}
        step_s = time_interleaved(steps, args.train_rounds, warmup=2)
        per_epoch = args.epoch_patches / args.train_batch
        print(
            f"\ntraining step, batch {args.train_batch}x{args.train_patch}x{args.train_patch}, torch {args.threads} "
            f"threads, median of {args.train_rounds} interleaved steps; epoch = {args.epoch_patches} patches"
        )
        print(f"{'config':46s} {'s/step':>8s} {'s/epoch':>8s} {'x served':>8s}")
        for name, median in step_s.items():
            print(f"{name:46s} {median:8.4f} {median * per_epoch:8.1f} {median / step_s['served']:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
