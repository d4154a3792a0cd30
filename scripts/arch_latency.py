"""How fast would a smaller GNCNN run? ORT CPU latency of one batch of 32×32 images for several
GNCNN widths and depths, fp32 and int8, next to the served architecture, interleaved in one
process so the ratios hold on a noisy machine. Needs the export extra (torch, onnx).

    python -m scripts.arch_latency                 # the default candidates, batch 32, 2 threads
    python -m scripts.arch_latency --model '{"widths":[32,64,128],"depths":[1,1,1]}' --rounds 30

Weights are random (latency does not depend on them) and int8 is calibrated on random images:
the graphs have the ops and sizes of trained ones. Each candidate is exported exactly as
`normserve export` does (opset 18, weight standardization folded) and quantized with the same
QDQ recipe. Multiply-adds are counted by torch's FlopCounterMode (FLOPs / 2).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from normserve.contract import LOGITS_OUTPUT
from normserve.evaluation.runtime import cpu_session, time_interleaved
from normserve.export.onnx_export import export_onnx
from normserve.export.quantize import quantize_int8
from normserve.models.training.classifier import build_classifier

SERVED = Path(__file__).resolve().parents[1] / "models" / "configs" / "gncnn.json"
CANDIDATES: list[dict[str, Any]] = [
    {"widths": [48, 96, 192], "depths": [1, 2, 2]},
    {"widths": [32, 64, 128], "depths": [1, 2, 2]},
    {"widths": [64, 128, 256], "depths": [1, 1, 1]},
    {"widths": [32, 64, 128], "depths": [1, 1, 1]},
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.arch_latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", type=json.loads, help="GNCNN config overrides (JSON); repeatable")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    p.add_argument("--rounds", type=int, default=20, help="timed runs of each graph, interleaved")
    args = p.parse_args(argv)

    served = json.loads(SERVED.read_text())["config"]
    base = {k: served[k] for k in ("downsample", "conv", "gn", "act")}
    configs = [("served", served), *((json.dumps(c), {**base, **c}) for c in (args.model or CANDIDATES))]
    rng = np.random.default_rng(0)
    calibration = rng.random((64, 3, 32, 32), dtype=np.float32)
    x = rng.random((args.batch, 3, 32, 32), dtype=np.float32)
    sessions: dict[tuple[str, str], ort.InferenceSession] = {}
    macs: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg) in enumerate(configs):
            torch.manual_seed(0)
            model = build_classifier(cfg).eval()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(torch.rand(1, 3, 32, 32))
            macs[name] = counter.get_total_flops() / 2
            fp32, int8 = Path(tmp) / f"{i}.onnx", Path(tmp) / f"{i}.int8.onnx"
            export_onnx("gncnn", model, fp32)
            quantize_int8(fp32, int8, calibration)
            sessions[(name, "fp32")] = cpu_session(fp32, args.threads)
            sessions[(name, "int8")] = cpu_session(int8, args.threads)
        calls = {k: partial(s.run, [LOGITS_OUTPUT], {"image": x}) for k, s in sessions.items()}
        medians = time_interleaved(calls, args.rounds)
    reference = medians[("served", "int8")]
    print(f"batch {args.batch}, 32x32, ORT CPU {args.threads} threads, median of {args.rounds} interleaved runs")
    print(f"{'config':58s} {'prec':4s} {'MMAC/img':>8s} {'ms':>7s} {'x served int8':>13s}")
    for (name, precision), median in medians.items():
        print(f"{name:58s} {precision:4s} {macs[name] / 1e6:8.1f} {median * 1e3:7.2f} {median / reference:13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
