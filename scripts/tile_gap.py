"""How much does tiling change an InstanceNorm denoiser's output? Mean PSNR of whole-image vs tiled
denoising (`service.tasks.tiled_run`, the loop /reconstruct runs) on a clean test set with Gaussian noise, for several tile sizes,
overlaps and blends. Needs only onnxruntime, numpy and Pillow (no torch).

    python -m scripts.tile_gap --model model_repository/in_autoencoder/1 \\
        --data ../shared/data/denoise/test/CBSD68 --tiles 128,192,256 --overlaps 16,32,64

Protocol (the one `models.training.denoiser.evaluate_denoiser` uses): images in sorted file order, clean in
[0, 1], plus N(0, sigma/255) noise from one generator seeded with --seed, not clipped; the
output is clipped to [0, 1]; PSNR over RGB with peak 1. `--upscale K` enlarges every clean
image K times (bicubic) and `--mosaic N` stitches N x N images (portrait ones turned) into one
before the noise is added, to see the gap on images much larger than a tile. The gap is
whole minus tiled mean PSNR, in dB: positive when tiling costs quality; `|gap|` is the mean
per-image absolute gap and `vs whole` the PSNR of the tiled output against the whole-image one
(how far tiling moves the output at all). Per-image lines go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from normserve.evaluation.runtime import cpu_session
from normserve.files import IMAGE_SUFFIXES
from normserve.quality import psnr
from normserve.service.tasks import denoise
from normserve.service.tiling import BLENDS, Blend, overhead, tile_count


@dataclass
class Row:
    tile: int
    overlap: int
    blend: str
    tiles_per_image: float
    compute_overhead: float  # model pixels / image pixels
    psnr_whole: float
    psnr_tiled: float
    gap_db: float  # mean over images of (whole - tiled)
    max_gap_db: float  # worst image
    abs_gap_db: float  # mean over images of |whole - tiled|
    psnr_vs_whole: float  # tiled output against the whole-image output: how far tiling moves it
    seconds: float


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _blend_list(text: str) -> list[Blend]:
    blends = [v.strip() for v in text.split(",") if v.strip()]
    bad = [b for b in blends if b not in BLENDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown blend {bad}; choose from {list(BLENDS)}")
    return [b for b in BLENDS if b in blends]


def clean_images(folder: Path, limit: int, upscale: int, mosaic: int) -> Iterator[tuple[str, np.ndarray]]:
    """(name, clean float32 (H, W, 3) in [0, 1]) in sorted file order, enlarged or stitched as asked."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"{folder}: no images")
    images: list[tuple[str, np.ndarray]] = []
    for path in files:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if upscale > 1:
                rgb = rgb.resize((rgb.width * upscale, rgb.height * upscale), Image.Resampling.BICUBIC)
            images.append((path.stem, np.asarray(rgb)))
    if mosaic > 1:
        landscape = [(n, a if a.shape[0] <= a.shape[1] else np.rot90(a)) for n, a in images]
        shape = landscape[0][1].shape
        landscape = [(n, a) for n, a in landscape if a.shape == shape]  # the common size only
        per = mosaic * mosaic
        images = []
        for k in range(0, len(landscape) - per + 1, per):
            group = landscape[k : k + per]
            rows = [np.concatenate([a for _, a in group[r * mosaic : (r + 1) * mosaic]], axis=1) for r in range(mosaic)]
            images.append(("+".join(n for n, _ in group), np.concatenate(rows, axis=0)))
    for name, pixels in images[: limit or None]:
        yield name, pixels.astype(np.float32) / 255.0


def make_runner(model: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    path = model / "model.onnx" if model.is_dir() else model
    session = cpu_session(path, threads)
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        y: np.ndarray = session.run([output_name], {input_name: x})[0]
        return y

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.tile_gap", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="model.onnx or a version folder holding one")
    p.add_argument("--data", type=Path, required=True, help="folder of clean test images (CBSD68)")
    p.add_argument("--sigma", type=float, default=25.0, help="noise sigma on the 0-255 scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiles", type=_int_list, default=[128, 192, 256], help="comma list of tile sizes")
    p.add_argument("--overlaps", type=_int_list, default=[16, 32, 64], help="comma list of minimum overlaps")
    p.add_argument("--blends", type=_blend_list, default=["cosine"], help=f"comma list of {list(BLENDS)}")
    p.add_argument("--batch", type=int, default=4, help="tiles per model call")
    p.add_argument("--upscale", type=int, default=1, help="enlarge each clean image K times (bicubic)")
    p.add_argument("--mosaic", type=int, default=1, help="stitch N x N images into one")
    p.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT's default)")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file ('-' = stdout only)")
    args = p.parse_args(argv)

    run = make_runner(args.model, args.threads)
    configs = [(t, o, b) for t in args.tiles for o in args.overlaps for b in args.blends if 0 <= o < t and 2 * o <= t]
    rng = np.random.default_rng(args.seed)
    whole: list[float] = []
    noisy_psnr: list[float] = []
    tiled: dict[tuple[int, int, str], list[float]] = {c: [] for c in configs}
    agreement: dict[tuple[int, int, str], list[float]] = {c: [] for c in configs}
    seconds: dict[tuple[int, int, str], float] = dict.fromkeys(configs, 0.0)
    shapes: list[tuple[int, int]] = []
    started = time.perf_counter()
    for name, clean in clean_images(args.data, args.limit, args.upscale, args.mosaic):
        noisy = (clean + rng.normal(0.0, args.sigma / 255.0, clean.shape)).astype(np.float32)
        h, w = clean.shape[:2]
        shapes.append((h, w))
        noisy_psnr.append(psnr(noisy, clean))
        reference = np.clip(run(noisy.transpose(2, 0, 1)[None])[0].transpose(1, 2, 0), 0, 1)
        whole.append(psnr(reference, clean))
        line = [f"{name} {w}x{h} whole {whole[-1]:.2f}"]
        for c in configs:
            t0 = time.perf_counter()
            out = denoise(run, noisy, c[0], c[1], args.batch, c[2])
            seconds[c] += time.perf_counter() - t0
            out = np.clip(out, 0, 1)
            tiled[c].append(psnr(out, clean))
            agreement[c].append(psnr(out, reference))
            line.append(f"{c[0]}/{c[1]}/{c[2]} {whole[-1] - tiled[c][-1]:+.3f}")
        print("  ".join(line), file=sys.stderr, flush=True)

    n = len(whole)
    rows = []
    for c in configs:
        gaps = np.asarray(whole) - np.asarray(tiled[c])
        rows.append(
            Row(
                tile=c[0],
                overlap=c[1],
                blend=c[2],
                tiles_per_image=float(np.mean([tile_count(h, w, c[0], c[1]) for h, w in shapes])),
                compute_overhead=float(np.mean([overhead(h, w, c[0], c[1]) for h, w in shapes])),
                psnr_whole=float(np.mean(whole)),
                psnr_tiled=float(np.mean(tiled[c])),
                gap_db=float(gaps.mean()),
                max_gap_db=float(gaps.max()),
                abs_gap_db=float(np.abs(gaps).mean()),
                psnr_vs_whole=float(np.mean(agreement[c])),
                seconds=seconds[c],
            )
        )
    sizes = sorted(set(shapes))
    stream = sys.stderr if str(args.json) == "-" else sys.stdout  # stdout carries only the JSON then
    print(
        f"{n} images ({', '.join(f'{w}x{h}' for h, w in sizes[:4])}{'...' if len(sizes) > 4 else ''}) from "
        f"{args.data}, sigma {args.sigma:g}, seed {args.seed}, model {args.model}; "
        f"noisy {np.mean(noisy_psnr):.3f} dB, whole image {np.mean(whole):.3f} dB "
        f"({time.perf_counter() - started:.0f} s)",
        file=stream,
    )
    print(
        f"{'tile':>5} {'overlap':>7} {'blend':>7} {'tiles':>6} {'compute':>7} {'tiled dB':>9} "
        f"{'gap dB':>7} {'|gap|':>6} {'max gap':>7} {'vs whole':>8}",
        file=stream,
    )
    for r in rows:
        print(
            f"{r.tile:>5} {r.overlap:>7} {r.blend:>7} {r.tiles_per_image:>6.1f} {r.compute_overhead:>6.2f}x "
            f"{r.psnr_tiled:>9.3f} {r.gap_db:>7.3f} {r.abs_gap_db:>6.3f} {r.max_gap_db:>7.3f} {r.psnr_vs_whole:>8.2f}",
            file=stream,
        )
    if args.json:
        report = {
            "model": str(args.model),
            "data": str(args.data),
            "sigma": args.sigma,
            "seed": args.seed,
            "upscale": args.upscale,
            "mosaic": args.mosaic,
            "images": n,
            "psnr_noisy": float(np.mean(noisy_psnr)),
            "psnr_whole": float(np.mean(whole)),
            "rows": [asdict(r) for r in rows],
        }
        text = json.dumps(report, indent=2)
        if str(args.json) == "-":
            print(text)
        else:
            args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
