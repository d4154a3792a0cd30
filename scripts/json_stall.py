"""How long /v2/health/live waits while large V2 JSON bodies are parsed: a real `normserve serve`
(one worker) gets `--requests` JSON inference requests of `--mib` MiB from each of `--clients`
clients at once (each one request after another) while another client probes /v2/health/live
every 20 ms; prints the probes' worst, p99 and median latency.

    flock /tmp/normserve-bench.lock python -m scripts.json_stall --mib 3.9 --clients 8 --requests 2
    flock /tmp/normserve-bench.lock python -m scripts.json_stall --mib 3.9 --clients 8 --checkout /work/main

`--checkout` runs another checkout's code (e.g. main, which parsed the JSON on the event loop).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=float, default=16.0, help="size of each JSON body")
    p.add_argument("--requests", type=int, default=4, help="per client")
    p.add_argument("--clients", type=int, default=1, help="clients sending at once")
    p.add_argument("--checkout", type=Path, default=None)
    args = p.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")}
    env.update({"NORMSERVE_WORKERS": "1", "NORMSERVE_ACCESS_LOG": "false", "NORMSERVE_LOG_LEVEL": "warning"})
    cwd = args.checkout or REPO
    if args.checkout:
        env["PYTHONPATH"] = str(args.checkout.resolve())
    command = [sys.executable, "-m", "normserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--model-repository", str(REPO / "model_repository")]
    server = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(base + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        # (1, 3, H, 64) float values written as "0.123456," (9 bytes each) to about --mib MiB
        h = max(8, int(args.mib * 2**20 / 9 / (3 * 64)))
        values = ",".join(["0.123456"] * (3 * h * 64))
        body = f'{{"inputs":[{{"name":"image","shape":[1,3,{h},64],"datatype":"FP32","data":[{values}]}}]}}'.encode()
        latencies: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=base, timeout=30) as client:
                while not stop.is_set():
                    started = time.monotonic()
                    client.get("/v2/health/live")
                    latencies.append(time.monotonic() - started)
                    stop.wait(0.02)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()

        def client_requests(_: int) -> list[int]:
            with httpx.Client(base_url=base, timeout=120) as client:
                return [
                    client.post("/v2/models/in_autoencoder/infer", content=body).status_code
                    for _ in range(args.requests)
                ]

        with ThreadPoolExecutor(args.clients) as pool:
            statuses = sorted(s for some in pool.map(client_requests, range(args.clients)) for s in some)
        stop.set()
        thread.join()
        ms = sorted(1000 * t for t in latencies)
        print(
            f"{args.checkout or 'this checkout'}: {args.clients} clients x {args.requests} x "
            f"{len(body) / 2**20:.1f} MiB JSON, statuses {statuses}; /v2/health/live worst {ms[-1]:.0f} ms, "
            f"p99 {ms[int(0.99 * (len(ms) - 1))]:.0f} ms, median {statistics.median(ms):.1f} ms over {len(ms)} probes; "
            f"loadavg {Path('/proc/loadavg').read_text().split()[:3]}"
        )
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
