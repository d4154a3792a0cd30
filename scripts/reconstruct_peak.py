"""Peak memory and latency of one /reconstruct request on a large image, measured on a real
`normserve serve` process (Linux: peak RSS is the process's VmHWM from /proc).

    python -m scripts.reconstruct_peak --size 6000x4000                 # tiled (the defaults)
    python -m scripts.reconstruct_peak --size 2048x1024 --whole         # whole image at once

`--whole` sets NORMSERVE_RECONSTRUCT_TILE above the image's sides, which is how the service ran
before tiling. Whole-image memory grows with pixels (several GB at a few MP): mind the machine.
The image is a smooth colour gradient plus Gaussian noise (sigma 25, a noisy photo's worth of
detail), sent as JPEG quality 95 unless --png. One request per server, so the peak is that
request's, after model load and warm-up (reported separately).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from normserve.service.settings import Settings
from normserve.service.tiling import tile_count


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def _rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc/<pid>/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB
    return fields["VmRSS"], fields["VmHWM"]


def make_image(width: int, height: int, png: bool) -> bytes:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    pixels = np.empty((height, width, 3), np.uint8)
    for c, base in enumerate((x * 0.8 + y * 0.2, y * 0.7 + 0.15, 1 - x * 0.5 - y * 0.4)):
        band = base * 255 + rng.normal(0, 25, (height, width)).astype(np.float32)
        pixels[..., c] = np.clip(band, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(
        buf, format="PNG" if png else "JPEG", **({"compress_level": 1} if png else {"quality": 95})
    )
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.reconstruct_peak", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=_size, default=(6000, 4000), help="WIDTHxHEIGHT (default 6000x4000)")
    p.add_argument("--whole", action="store_true", help="no tiling: the whole image in one model run")
    p.add_argument("--png", action="store_true", help="send PNG instead of JPEG")
    p.add_argument("--accept", default="image/png", help="Accept header of the request")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--env", action="append", default=[], metavar="NORMSERVE_X=V", help="extra server settings")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the answer")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    width, height = args.size

    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")}
    env.update(
        NORMSERVE_MAX_RECONSTRUCT_PIXELS=str(max(width * height, 16)),
        NORMSERVE_MAX_IMAGE_PIXELS=str(max(width * height, 40_000_000)),
        NORMSERVE_MAX_BODY_BYTES=str(1 << 30),
    )
    if args.whole:
        env["NORMSERVE_RECONSTRUCT_TILE"] = str(max(width, height))
    env.update(kv.split("=", 1) for kv in args.env)
    data = make_image(width, height, args.png)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "normserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--model-repository", args.model_repository, "--workers", "1"]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    sys.exit(f"server did not become ready:\n{log.read().decode(errors='replace')}")
                try:
                    if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            ready_rss, ready_peak = _rss_mib(server.pid)
            started = time.perf_counter()
            response = httpx.post(
                f"{url}/reconstruct",
                content=data,
                headers={"content-type": "image/png" if args.png else "image/jpeg", "accept": args.accept},
                timeout=args.timeout,
            )
            latency = time.perf_counter() - started
            _, peak = _rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(30)
    if response.status_code != 200:
        sys.exit(f"/reconstruct answered {response.status_code}: {response.text[:500]}")
    defaults = Settings.model_fields
    tile = int(env.get("NORMSERVE_RECONSTRUCT_TILE", defaults["reconstruct_tile"].default))
    overlap = int(env.get("NORMSERVE_RECONSTRUCT_OVERLAP", defaults["reconstruct_overlap"].default))
    result = {
        "size": f"{width}x{height}",
        "megapixels": round(width * height / 1e6, 2),
        "mode": "whole" if args.whole else f"tiled {tile}/{overlap}, {tile_count(height, width, tile, overlap)} tiles",
        "request_bytes": len(data),
        "response_bytes": len(response.content),
        "response_type": response.headers["content-type"],
        "latency_s": round(latency, 2),
        "rss_ready_mib": round(ready_rss),
        "peak_rss_ready_mib": round(ready_peak),
        "peak_rss_mib": round(peak),
        "request_peak_over_ready_mib": round(peak - ready_rss),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print("  ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
