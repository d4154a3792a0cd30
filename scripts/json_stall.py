"""How long /v2/health/live waits while a large V2 JSON body is parsed: a real `normserve serve`
(one worker) gets `--requests` JSON inference requests of `--mib` MiB one after another while a
second client probes /v2/health/live every 20 ms; prints the probes' worst and median latency.

    flock /tmp/normserve-bench.lock python -m scripts.json_stall --mib 16
    flock /tmp/normserve-bench.lock python -m scripts.json_stall --mib 16 --checkout /work/main

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
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=float, default=16.0, help="size of each JSON body")
    p.add_argument("--requests", type=int, default=4)
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
        statuses = []
        with httpx.Client(base_url=base, timeout=120) as client:
            for _ in range(args.requests):
                statuses.append(client.post("/v2/models/in_autoencoder/infer", content=body).status_code)
        stop.set()
        thread.join()
        print(
            f"{args.checkout or 'this checkout'}: {args.requests} x {len(body) / 2**20:.1f} MiB JSON, statuses {statuses}; "
            f"/v2/health/live worst {max(latencies) * 1000:.0f} ms, median {statistics.median(latencies) * 1000:.1f} ms "
            f"over {len(latencies)} probes; loadavg {Path('/proc/loadavg').read_text().split()[:3]}"
        )
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
