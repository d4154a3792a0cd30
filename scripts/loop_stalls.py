"""What makes /v2/health/live wait during an attack: one default `normserve serve` (2 workers),
one case, the health probe every 50 ms from a process of its own (as in
tests/service/test_adversarial.py), and each worker's main thread read from /proc every 5 ms
(its CPU time and its run-queue wait, `schedstat`). Prints the probe's worst, p99 and median and,
for the five slowest probes, what each worker's main thread did meanwhile: running (CPU), waiting
for a core (run-queue wait), or neither (sleeping: waiting for the GIL that another thread of the
worker holds, or idle). With --trace the server runs on asyncio's loop with
scripts/looptrace/sitecustomize.py, which logs every loop iteration busier than --trace ms with
its wall and CPU time and its slowest callbacks. Run it under the bench lock:

    flock /tmp/normserve-bench.lock .venv/bin/python scripts/loop_stalls.py --case "unfinished bodies"
    flock /tmp/normserve-bench.lock .venv/bin/python scripts/loop_stalls.py \\
        --case "/features?resize=false 384x384 x 4" --trace 10 [--tree /tmp/old]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "service"))
sys.path.insert(0, str(REPO / "scripts"))

import probe_ab  # noqa: E402
import servers  # noqa: E402
from test_adversarial import PROBE  # noqa: E402

# the probe prints when each probe began too (wall clock), to line it up with the /proc samples
TIMED_PROBE = PROBE.replace(
    "print(time.perf_counter() - started, int(ok), flush=True)",
    "print(time.perf_counter() - started, int(ok), time.time() - (time.perf_counter() - started), flush=True)",
)
assert TIMED_PROBE != PROBE


def unfinished_bodies(base_url: str, n: int = 120, declared: int = 32 << 20) -> list[int]:
    """test_adversarial's case: n connections each declare a 32 MiB body, send all of it but the
    last byte and give up after 10 s; the statuses they read (0: none)."""
    host, port = base_url.removeprefix("http://").split(":")
    chunk = bytes(1 << 20)

    def attacker(_: int) -> int:
        started = time.perf_counter()
        with socket.create_connection((host, int(port)), timeout=30) as c:
            c.sendall(
                b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n"
                % declared
            )
            try:
                for i in range(0, declared - 1, len(chunk)):
                    c.sendall(chunk[: min(len(chunk), declared - 1 - i)])
            except OSError:  # answered (503, Connection: close) and closed while sending
                pass
            try:
                c.settimeout(max(0.1, 10 - (time.perf_counter() - started)))
                answer = c.recv(256)
            except OSError:
                answer = b""
        return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(attacker, range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", required=True, choices=["unfinished bodies", *probe_ab.CASES])
    parser.add_argument("--tree", type=Path, default=REPO, help="the checkout whose server runs")
    parser.add_argument("--trace", type=float, default=0, help="log loop iterations busier than this (ms)")
    args = parser.parse_args()
    tree = args.tree.resolve()
    servers.SERVER_TREE = tree
    trace = Path(tempfile.mkdtemp(prefix="normserve-looptrace-"))
    env = {"PYTHONPATH": str(tree)}
    if args.trace:
        env = {
            "PYTHONPATH": f"{REPO / 'scripts' / 'looptrace'}:{tree}",
            "NORMSERVE_LOOPTRACE": str(trace),
            "NORMSERVE_LOOPTRACE_MS": str(args.trace),
        }
    with tempfile.TemporaryDirectory() as tmp, servers.running_server(Path(tmp) / "server.log", env=env) as s:
        probe_ab.warm(s.base_url)
        time.sleep(0.5)
        pid = s.process.pid
        workers = [
            int(k)
            for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text()
        ]
        samples: dict[int, list[tuple[float, float, float]]] = {w: [] for w in workers}
        stop = threading.Event()

        def sample() -> None:  # (wall time, CPU ms, run-queue wait ms) of each worker's main thread
            while not stop.wait(0.005):
                now = time.time()
                for w in workers:
                    cpu, wait, _ = Path(f"/proc/{w}/task/{w}/schedstat").read_text().split()
                    samples[w].append((now, int(cpu) / 1e6, int(wait) / 1e6))

        prober = probe_ab.start_prober(s.base_url, TIMED_PROBE)
        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.time()
        statuses = (
            unfinished_bodies(s.base_url)
            if args.case == "unfinished bodies"
            else probe_ab.post_all(s.base_url, probe_ab.CASES[args.case]())
        )
        t1 = time.time()
        stop.set()
        sampler.join()
        out, _ = prober.communicate("stop\n", timeout=30)
    probes = [(1000 * float(line.split()[0]), float(line.split()[2])) for line in out.splitlines()]
    ms = np.array([p for p, _ in probes])
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"{args.case} on {tree}: statuses {dict(sorted((k, statuses.count(k)) for k in set(statuses)))}")
    print(
        f"probe worst {ms.max():.0f} ms, p99 {np.percentile(ms, 99):.0f}, median {np.median(ms):.1f} "
        f"({len(ms)} probes); load average {load}; a shared 2-core machine"
    )
    for latency, began in sorted(probes, reverse=True)[:5]:
        line = f"  probe {latency:.0f} ms at +{began - t0:.2f} s:"
        for w, ss in samples.items():
            inside = [x for x in ss if began - 0.005 <= x[0] <= began + latency / 1000 + 0.005]
            if len(inside) >= 2:
                (t1, c1, q1), (t2, c2, q2) = inside[0], inside[-1]
                line += f"  worker {w}: CPU {c2 - c1:.0f} ms, run-queue wait {q2 - q1:.0f} ms of {1000 * (t2 - t1):.0f}"
        print(line)
    for log in sorted(trace.glob("loop-*.jsonl")):
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        lines = sorted((x for x in lines if t0 <= x["t"] <= t1), key=lambda x: -x["wall_ms"])
        if lines:
            print(f"{log.stem}: {len(lines)} iterations over {args.trace:g} ms; the slowest (wall / CPU ms):")
        for x in lines[:5]:
            print(f"  +{x['t'] - t0:.2f} s: {x['wall_ms']} / {x['cpu_ms']}, {x['callbacks']} callbacks")
            for wall, cpu, what in x["slowest"][:2]:
                print(f"      {wall} / {cpu}  {what[:150]}")


if __name__ == "__main__":
    main()
