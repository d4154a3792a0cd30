"""Would int8 make the denoiser faster without costing PSNR? Per Conv of a served fp32 denoiser
graph: its share of the multiply-adds at --side x --side, and the PSNR change when that Conv
alone is int8. Then, timed interleaved in one process so the ratios hold on a noisy machine: fp32,
every Conv int8, and int8 on only the Convs that alone cost at most --tolerance dB. Needs the
export extra (onnx and ORT's quantization tools).

    python -m scripts.denoiser_int8                        # the newest in_autoencoder, 6 images
    python -m scripts.denoiser_int8 --images 68 --rounds 20

int8 is `normserve export --int8`'s recipe for the classifier (`export.quantize.quantize_int8`:
static QDQ, Conv weights per channel, activations per tensor from min/max calibration), here
calibrated on noisy random crops of the training images (sigma uniform in [0, --sigma-max], not
clipped, as the denoiser was trained). PSNR is `normserve eval denoiser`'s float protocol on the
first --images test images: the same per-image noise at --sigma, the output clipped to [0, 1].
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from normserve.evaluation.datasets import list_images, read_image
from normserve.evaluation.denoiser import gaussian_noise, noisy_float
from normserve.evaluation.runtime import cpu_session, time_interleaved
from normserve.export.onnx_export import INPUT_NAME
from normserve.export.quantize import quantize_int8
from normserve.quality import psnr
from normserve.service.imaging import to_tensor

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository" / "in_autoencoder"


@dataclass(frozen=True)
class ConvInfo:
    name: str
    weight: tuple[int, ...]  # (out, in / groups, kh, kw)
    out_hw: tuple[int, int]  # at side x side
    macs: int  # at side x side, batch 1


def newest_version(repository: Path = REPOSITORY) -> Path:
    versions = [p for p in repository.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file()]
    if not versions:
        raise SystemExit(f"no versions with a model.onnx in {repository}")
    return max(versions, key=lambda p: int(p.name))


def conv_infos(path: Path, side: int) -> list[ConvInfo]:
    """Every Conv node of the graph, with its output size and multiply-adds for one side x side
    image (read by running the graph with each Conv's output exposed)."""
    proto = onnx.load(str(path))
    weights = {i.name: tuple(int(d) for d in i.dims) for i in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    unnamed = [i for i, n in enumerate(convs) if not n.name]
    if unnamed or not convs:
        raise SystemExit(f"{path}: every Conv needs a name to be kept float ({len(convs)} Convs, unnamed {unnamed})")
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(
        onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None)
        for n in convs
        if n.output[0] not in known
    )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run([n.output[0] for n in convs], {INPUT_NAME: np.zeros((1, 3, side, side), np.float32)})
    infos = []
    for n, out in zip(convs, outs, strict=True):
        w = weights[n.input[1]]
        h, wd = int(out.shape[2]), int(out.shape[3])
        infos.append(ConvInfo(n.name, w, (h, wd), h * wd * int(np.prod(w))))
    return infos


def calibration_crops(folder: Path, n: int, crop: int, sigma_max: float, seed: int) -> np.ndarray:
    """n noisy crop x crop patches (float32 NCHW), each from a random training image at a random
    place, with Gaussian noise of a sigma drawn uniformly from [0, sigma_max] (0-255 scale)."""
    rng = np.random.default_rng(seed)
    files = list_images(folder)
    out = np.empty((n, 3, crop, crop), np.float32)
    for k in range(n):
        path = files[int(rng.integers(len(files)))]
        x = to_tensor(read_image(path))[0]
        if min(x.shape[1:]) < crop:
            raise SystemExit(f"{path} is smaller than the {crop}-pixel calibration crop")
        top, left = (int(rng.integers(0, s - crop + 1)) for s in x.shape[1:])
        sigma = rng.uniform(0.0, sigma_max)
        out[k] = x[:, top : top + crop, left : left + crop] + rng.standard_normal((3, crop, crop)) * sigma / 255.0
    return out


@dataclass(frozen=True)
class TestImages:
    clean: list[np.ndarray]  # float64 HWC in [0, 1]
    noisy: list[np.ndarray]  # float32 NCHW, as the graph takes them


def test_images(folder: Path, n: int, sigma: float, seed: int) -> TestImages:
    """The first n test images with `normserve eval denoiser`'s float-protocol noise."""
    clean, noisy = [], []
    for path in list_images(folder)[:n]:
        u8 = read_image(path).pixels
        x = noisy_float(u8, gaussian_noise(u8.shape, sigma, seed, path.name))
        clean.append(u8.astype(np.float64) / 255.0)
        noisy.append(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))
    return TestImages(clean, noisy)


def mean_psnr(s: ort.InferenceSession, images: TestImages) -> float:
    scores = []
    for x, clean in zip(images.noisy, images.clean, strict=True):
        y = s.run(None, {INPUT_NAME: x})[0][0].transpose(1, 2, 0)
        scores.append(psnr(np.clip(y, 0.0, 1.0), clean))
    return float(np.mean(scores))


def quantized(fp32: Path, out: Path, calibration: np.ndarray, int8: Sequence[str], convs: list[ConvInfo]) -> Path:
    """`fp32` with only the Convs named in `int8` quantized, written to `out`."""
    chosen = set(int8)
    quantize_int8(fp32, out, calibration, keep_float=[c.name for c in convs if c.name not in chosen])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.denoiser_int8", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="version folder with model.onnx (default: newest in_autoencoder)")
    p.add_argument("--data", type=Path, default=Path("../shared/data/denoise/test/CBSD68"), help="clean test images")
    p.add_argument("--train-data", type=Path, default=Path("../shared/data/denoise/train/CBSD432"))
    p.add_argument("--images", type=int, default=6, help="test images scored (first N, sorted)")
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the test images (and the crops)")
    p.add_argument("--calibration", type=int, default=64, help="calibration crops")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--sigma-max", type=float, default=55.0, help="calibration noise: sigma uniform in [0, this]")
    p.add_argument("--tolerance", type=float, default=0.05, help="dB a Conv may cost alone to be int8-safe")
    p.add_argument("--side", type=int, default=512, help="square image timed and counted")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads when timing")
    p.add_argument("--rounds", type=int, default=10, help="timed runs of each graph, interleaved")
    args = p.parse_args(argv)
    too_small = [n for n in ("images", "calibration", "crop", "side", "threads", "rounds") if getattr(args, n) < 1]
    if too_small:
        p.error(", ".join(f"--{n}" for n in too_small) + " must be at least 1")

    fp32 = (args.model or newest_version()) / "model.onnx"
    convs = conv_infos(fp32, args.side)
    total = sum(c.macs for c in convs)
    calibration = calibration_crops(args.train_data, args.calibration, args.crop, args.sigma_max, args.seed)
    images = test_images(args.data, args.images, args.sigma, args.seed)
    reference = mean_psnr(cpu_session(fp32, args.threads), images)
    print(f"{fp32}: {total / 1e9:.2f} G multiply-adds at {args.side}x{args.side} (Conv only)")
    print(f"fp32 PSNR {reference:.3f} dB on {len(images.clean)} images, sigma {args.sigma:g}")
    print(f"{'conv':24s} {'weight':>16s} {'output':>10s} {'MAC share':>9s} {'dB int8 alone':>13s}")
    with tempfile.TemporaryDirectory() as tmp:
        alone: dict[str, float] = {}
        for i, c in enumerate(convs):
            q = quantized(fp32, Path(tmp) / f"alone{i}.onnx", calibration, [c.name], convs)
            alone[c.name] = mean_psnr(cpu_session(q, args.threads), images) - reference
            shape = "x".join(map(str, c.weight))
            out = f"{c.out_hw[0]}x{c.out_hw[1]}"
            print(f"{c.name:24s} {shape:>16s} {out:>10s} {c.macs / total:9.1%} {alone[c.name]:+13.3f}", flush=True)
        safe = [c.name for c in convs if alone[c.name] >= -args.tolerance]
        safe_label = f"int8 where alone >= -{args.tolerance:g} dB"
        variants = {  # name: (graph, share of the multiply-adds in int8)
            "fp32": (fp32, 0.0),
            "every Conv int8": (
                quantized(fp32, Path(tmp) / "all.onnx", calibration, [c.name for c in convs], convs),
                1.0,
            ),
            safe_label: (
                quantized(fp32, Path(tmp) / "safe.onnx", calibration, safe, convs),
                sum(c.macs for c in convs if c.name in safe) / total,
            ),
        }
        sessions = {k: cpu_session(path, args.threads) for k, (path, _) in variants.items()}
        x = np.random.default_rng(args.seed).random((1, 3, args.side, args.side), dtype=np.float32)
        medians = time_interleaved({k: partial(s.run, None, {INPUT_NAME: x}) for k, s in sessions.items()}, args.rounds)
        base = medians["fp32"]
        print(f"\n{args.side}x{args.side}, ORT CPU {args.threads} threads, median of {args.rounds} interleaved runs")
        print(f"{'graph':32s} {'int8 MACs':>9s} {'dB':>7s} {'ms':>8s} {'x fp32':>7s}")
        for k, s in sessions.items():
            median = medians[k]
            delta = mean_psnr(s, images) - reference
            print(f"{k:32s} {variants[k][1]:9.0%} {delta:+7.3f} {median * 1e3:8.1f} {median / base:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
