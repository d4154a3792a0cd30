"""Idle RSS of a real `normserve serve` (its whole process tree, from /proc) at start-up, at the
peak of a burst of large requests, and while idle after it: what a server keeps at rest and
whether it gives back what a burst took.

    flock /tmp/normserve-bench.lock python -m scripts.idle_rss \\
        --variant default \\
        --variant no-trim NORMSERVE_MEMORY_TRIM_IDLE_S=0 \\
        --variant arena2 NORMSERVE_MEMORY_TRIM_IDLE_S=0 MALLOC_ARENA_MAX=2 \\
        --variant main PYTHON=/work/main/.venv/bin/python CWD=/work/main

Each variant is a server started with those environment variables (PYTHON and CWD pick another
checkout's interpreter and folder, e.g. main's, to measure before/after). The burst, the same for
every variant, runs `--rounds` times: /reconstruct of 1 MP JPEGs, /classify of 3 MP JPEGs and V2
binary tensors to the denoiser, `--concurrency` at a time. Idle RSS is read `--idle` seconds after
the last request. Prints one JSON line per variant and a table; the ratio is idle / start-up.
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from normserve.contract import RECONSTRUCTION_OUTPUT

REPO = Path(__file__).resolve().parents[1]


def tree_rss_mib(root: int) -> float:
    """VmRSS of a process and all its descendants, in MiB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def v2_binary(shape: tuple[int, ...]) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    tensor = {"name": "image", "shape": list(shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
    output = {"name": RECONSTRUCTION_OUTPUT, "parameters": {"binary_data": True}}
    header = json.dumps({"inputs": [tensor], "outputs": [output]}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def burst(base: str, rounds: int, concurrency: int) -> list[int]:
    reconstruct, classify = jpeg(1024, 1024, 1), jpeg(2048, 1536, 2)
    v2_body, v2_headers = v2_binary((1, 3, 512, 512))
    jobs = [
        ("/reconstruct", reconstruct, {"content-type": "image/jpeg"}),
        ("/classify", classify, {"content-type": "image/jpeg"}),
        ("/v2/models/in_autoencoder/infer", v2_body, v2_headers),
    ] * (concurrency * rounds // 3 + 1)

    def one(job: tuple[str, bytes, dict[str, str]]) -> int:
        path, body, headers = job
        return httpx.post(base + path, content=body, headers=headers, timeout=120).status_code

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, jobs[: concurrency * rounds]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(label: str, env_items: list[str], args: argparse.Namespace) -> dict[str, object]:
    extra = dict(item.split("=", 1) for item in env_items)
    python, cwd = extra.pop("PYTHON", sys.executable), extra.pop("CWD", str(REPO))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NORMSERVE_", "MALLOC_"))}
    env.update({"NORMSERVE_ACCESS_LOG": "false", "NORMSERVE_LOG_LEVEL": "warning", **extra})
    port = free_port()
    command = [python, "-m", "normserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--model-repository", str(REPO / "model_repository")]
    log = tempfile.NamedTemporaryFile(prefix=f"idle-rss-{label}-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, f"{label}: not ready, see {log.name}"
            try:
                if httpx.get(base + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        time.sleep(args.settle)
        start = tree_rss_mib(process.pid)
        peak, stop = [start], threading.Event()

        def sample() -> None:
            while not stop.wait(0.1):
                peak.append(tree_rss_mib(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        began = time.monotonic()
        statuses = burst(base, args.rounds, args.concurrency)
        burst_s = time.monotonic() - began
        stop.set()
        sampler.join()
        idle: dict[str, float] = {}
        t0 = time.monotonic()
        for at in sorted(args.idle):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            idle[f"{at:g}s"] = round(tree_rss_mib(process.pid), 1)
        last = idle[f"{max(args.idle):g}s"]
        return {
            "variant": label,
            "env": env_items,
            "startup_mib": round(start, 1),
            "peak_mib": round(max(peak), 1),
            "idle_mib": idle,
            "idle_over_startup": round(last / start, 3),
            "burst_s": round(burst_s, 1),
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        }
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("LABEL", "ENV=VALUE"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after ready before start-up RSS")
    parser.add_argument("--idle", type=float, nargs="+", default=[5.0, 20.0, 60.0])
    args = parser.parse_args(argv)
    results = []
    for label, *env_items in args.variant:
        result = measure(label, env_items, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(
        f"\n{'variant':<14} {'start-up':>9} {'peak':>8} "
        + " ".join(f"{'idle ' + k:>10}" for k in results[0]["idle_mib"])
        + "  ratio"
    )  # type: ignore[union-attr]
    for r in results:
        idle = " ".join(f"{v:>10.0f}" for v in r["idle_mib"].values())  # type: ignore[union-attr]
        print(f"{r['variant']:<14} {r['startup_mib']:>9.0f} {r['peak_mib']:>8.0f} {idle}  {r['idle_over_startup']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
