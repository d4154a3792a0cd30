"""Calibrate the memory budget's estimates (service/budget.py) against the real pipeline.

Each case runs in a fresh Python process: the image file is read, the peak RSS is reset
(`/proc/self/clear_refs`, 5), the service's decode pipeline runs (open → plan → decode →
to_tensor, resized or at native size), and the peak (VmHWM) above the RSS before it is compared
with the plan's estimate. Model runs are measured the same way, one ORT run per shape.

    python -m normserve.bench.budget                 # the table, for the docs
    python -m normserve.bench.budget --quick         # the cases the tests run

tests/service/test_budget.py runs the quick cases and fails when an estimate is below its peak.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

_CHILD = r"""
import json, sys
import numpy as np
from normserve.service.state import server_state

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

kind, path, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if kind == "decode":
    from normserve.service.imaging import decode_planned, open_image, plan_decode, to_tensor
    data = open(path, "rb").read()
    size = tuple(arg) if arg else None
    open_image(data, 10**9)  # imports and first-call costs outside the measurement
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    plan = plan_decode(open_image(data, 10**9), size)
    image = decode_planned(plan)
    x = to_tensor(image, size)
    peak = status("VmHWM:")
    estimate = max(plan.peak_bytes, plan.tensor_phase_bytes(size))
elif kind == "route":
    import asyncio, httpx
    from normserve.service.app import create_app
    from normserve.service.settings import Settings
    body = open(path, "rb").read()

    async def main():
        app = create_app(Settings(_env_file=None, model_repository=arg["repository"], workers=1, access_log=False,
                                version_policy="latest:1"))
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=120
        ) as client:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = status("VmRSS:")
            r = await client.post(arg["path"], content=body, headers=arg["headers"])
            peak = status("VmHWM:")
            assert r.status_code == 200, r.text
            return before, peak, server_state(app).budget.peak

    before, peak, estimate = asyncio.run(main())
    peak -= len(body)  # the test client's copy of the body, which the server's reservation does not hold
else:
    import onnxruntime as ort
    from normserve.service.budget import run_bytes
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: np.zeros((1, 3, 32, 32), np.float32)})
    x = np.zeros(arg["shape"], np.float32)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    session.run(None, {name: x})
    peak = status("VmHWM:")
    estimate = run_bytes(arg["task"], arg["shape"][0] * arg["shape"][2] * arg["shape"][3])
print(json.dumps({"peak": peak - before, "estimate": estimate}))
"""


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    size: tuple[int, int] | None  # the route's resize target, None = native size


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, channels: int, seed: int = 0) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def decode_cases(side: int) -> list[Case]:
    """One case per image mode / format the pipeline treats differently, `side` x `side`."""
    w = h = side
    zeros16 = Image.fromarray(np.zeros((h, w), np.uint16))
    ramp16 = Image.fromarray((np.arange(w * h, dtype=np.uint32) % 65536).astype(np.uint16).reshape(h, w))
    floats = Image.fromarray(np.linspace(0, 1, w * h, dtype=np.float32).reshape(h, w), mode="F")
    rgb = Image.fromarray(_noise(w, h, 3))
    rgba = Image.fromarray(_noise(w, h, 4), "RGBA")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = [
        ("PNG I;16 zeros", _encode(zeros16, "PNG")),
        ("PNG I;16 ramp", _encode(ramp16, "PNG")),
        ("TIFF F", _encode(floats, "TIFF")),
        ("PNG RGB noise", _encode(rgb, "PNG", compress_level=1)),
        ("PNG RGBA noise", _encode(rgba, "PNG", compress_level=1)),
        ("PNG P", _encode(pal, "PNG")),
        ("PNG L", _encode(rgb.convert("L"), "PNG", compress_level=1)),
        ("PNG 1-bit", _encode(rgb.convert("1"), "PNG")),
        ("GIF", _encode(pal, "GIF")),
        ("WebP lossless", _encode(rgb, "WEBP", lossless=True, method=0)),
        ("WebP lossy", _encode(rgb, "WEBP", quality=80, method=0)),
        ("JPEG baseline", _encode(rgb, "JPEG", quality=90)),
        ("JPEG progressive", _encode(rgb, "JPEG", quality=90, progressive=True)),
        ("JPEG CMYK", _encode(rgb.convert("CMYK"), "JPEG", quality=90)),
        ("JPEG rotated (EXIF 6)", _encode(rgb, "JPEG", quality=90, exif=exif)),
        ("BMP", _encode(rgb, "BMP")),
    ]
    return [Case(f"{name}, {target}", data, size) for name, data in cases for target, size in _TARGETS]


_TARGETS: list[tuple[str, tuple[int, int] | None]] = [("native", None), ("resized to 32x32", (32, 32))]

RUN_CASES = [
    ("gncnn", "classification", [1, 3, 256, 256]),
    ("gncnn", "classification", [32, 3, 32, 32]),
    ("in_autoencoder", "denoising", [1, 3, 256, 256]),
    ("in_autoencoder", "denoising", [2, 3, 256, 256]),
]


def _child(kind: str, path: str, arg: object) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, path, json.dumps(arg)], capture_output=True, text=True, check=True
    )
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure_decode(case: Case) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".img") as f:
        f.write(case.data)
        f.flush()
        return _child("decode", f.name, list(case.size) if case.size else None)


def measure_route(repository: Path, path: str, body: bytes, headers: dict[str, str]) -> dict[str, int]:
    """One request to a fresh in-process app: its peak RSS above the app's, and its reservation."""
    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        arg = {"repository": str(repository.resolve()), "path": path, "headers": headers}
        return _child("route", f.name, arg)


def newest_version(repository: Path, model: str) -> Path:
    versions = sorted((p for p in (repository / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return versions[-1] / "model.onnx"


def measure_run(repository: Path, model: str, task: str, shape: list[int]) -> dict[str, int]:
    return _child("run", str(newest_version(repository, model)), {"task": task, "shape": shape})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=3000, help="image side in pixels (default 3000)")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--quick", action="store_true", help="600 px images, the decode cases only")
    args = p.parse_args(argv)
    side = 600 if args.quick else args.side
    print(f"| case ({side}x{side}) | measured peak MiB | estimate MiB | estimate / peak |")
    print("|---|---:|---:|---:|")
    for case in decode_cases(side):
        r = measure_decode(case)
        print(
            f"| {case.name} | {r['peak'] / 2**20:.1f} | {r['estimate'] / 2**20:.1f} | {r['estimate'] / max(r['peak'], 1):.2f} |"
        )
    if args.quick:
        return
    for model, task, shape in RUN_CASES:
        r = measure_run(args.repository, model, task, shape)
        print(
            f"| {model} run {shape} | {r['peak'] / 2**20:.1f} | {r['estimate'] / 2**20:.1f} | {r['estimate'] / max(r['peak'], 1):.2f} |"
        )


if __name__ == "__main__":
    main()
