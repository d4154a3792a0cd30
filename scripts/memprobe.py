"""What a worker keeps after a burst, seen from inside it (debugging issue 26's idle RSS).

    flock /tmp/normserve-bench.lock .venv/bin/python scripts/memprobe.py OUT_DIR [--idle 60] \\
        [--case grpc] [ENV=VALUE ...]

Starts a default `normserve serve` (2 workers) with scripts/memprobe/ first on PYTHONPATH (its
sitecustomize.py dumps a process's memory on SIGUSR2), warms it as the adversarial suite does,
dumps every process of the tree (start-up), runs the case, waits `--idle` seconds, dumps again,
and prints per process: anonymous RSS by kind of mapping, glibc's arenas (from the system / free),
pymalloc's arenas, and what each further step (malloc_trim, gc, arena shrink) gave back.
Set PYTHONTRACEMALLOC=8 among the ENV to list the Python allocations that grew.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "service"))

from proctree import rss, tree  # noqa: E402
from servers import running_server  # noqa: E402


def grpc_feature_maps(server: object) -> list[str]:
    """The adversarial suite's gRPC case: 8 ModelInfer of gncnn at 384 x 384, every output."""
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    x = np.full((1, 3, 384, 384), 0.5, np.float32)

    def one(_: int) -> str:
        client = triton_grpc.InferenceServerClient(server.grpc_address)  # type: ignore[attr-defined]
        inp = triton_grpc.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            client.infer("gncnn", [inp], client_timeout=60)
            return "OK"
        except InferenceServerException as exc:
            return str(exc.status())

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(8)))


CASES = {"grpc": grpc_feature_maps}


def dump_all(pids: list[int], out: Path, wait_s: float = 30.0) -> dict[int, dict]:
    """SIGUSR2 to every process of the tree; their newest dumps."""
    before = {p.name for p in out.glob("*.json")}
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + wait_s
    found: dict[int, dict] = {}
    while time.monotonic() < deadline and len(found) < len(pids):
        time.sleep(0.5)
        for path in out.glob("*.json"):
            if path.name not in before:
                pid = int(path.name.split("-")[0])
                try:
                    found[pid] = json.loads(path.read_text())
                except json.JSONDecodeError:
                    continue  # still being written
    return found


def kib(x: float) -> str:
    return f"{x / 1024:7.1f}"


def summary(label: str, dump: dict) -> str:
    lines = [f"  [{label}] threads {sum(dump['threads'].values())}: {dump['threads']}"]
    for step in ("as_is", "malloc_trim", "gc", "shrink"):
        v = dump[step]
        kinds = v["smaps"]["anon_kib_by_kind"]
        arenas = v["malloc_info"]
        mi = v["mallinfo2_kib"]
        lines.append(
            f"    {step:<11} anon {kib(v['rollup_kib']['Anonymous'])} MiB | "
            + " | ".join(f"{k.split(' (')[0]} {kib(n)}" for k, n in sorted(kinds.items()))
            + f" | malloc in use {kib(mi['uordblks'])} free {kib(mi['fordblks'])} mmapped {kib(mi['hblkhd'])}"
            + " | arenas "
            + ", ".join(
                f"#{a['arena']} sys {kib(a['system_kib'] or 0)} free {kib((a['free_rest_kib'] or 0) + (a['free_fast_kib'] or 0))}"
                for a in arenas
            )
            + f" | pymalloc {v['pymalloc']}"
        )
    lines.append(
        "    largest anonymous mappings (as is): "
        + ", ".join(
            f"{m['kind'].split(' (')[0]} {m['size_kib'] // 1024} MiB rss {m['anon'] // 1024}"
            for m in dump["as_is"]["smaps"]["largest_anon"][:8]
        )
    )
    for a in dump.get("arrays", [])[:8]:
        lines.append(f"    live array {a['kib']} KiB {a['shape']} {a['dtype']} base {a['base']} held by {a['held_by']}")
        for chain in a.get("chains", []):
            lines.append(f"      referrers: {chain}")
    if dump.get("tracemalloc_growth"):
        for g in dump["tracemalloc_growth"][:8]:
            lines.append(f"    tracemalloc +{g['kib']} KiB ({g['count']:+d}): {' <- '.join(reversed(g['where'][-3:]))}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("env", nargs="*", help="ENV=VALUE for the server")
    parser.add_argument("--case", choices=sorted(CASES), default="grpc")
    parser.add_argument("--idle", type=float, default=60.0)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(item.split("=", 1) for item in args.env)
    env |= {
        "PYTHONPATH": os.pathsep.join([str(REPO / "scripts" / "memprobe"), os.environ.get("PYTHONPATH", "")]),
        "MEMPROBE_DIR": str(out),
        "NORMSERVE_ACCESS_LOG": env.get("NORMSERVE_ACCESS_LOG", "false"),
    }
    with running_server(out / "server.log", env=env) as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as c:  # warm both workers, as the suite does
            from images import encode, noise  # tests/service/images.py
            from PIL import Image

            for _ in range(4):
                c.post(
                    "/classify",
                    content=encode(Image.fromarray(noise(32, 32)), "PNG"),
                    headers={"content-type": "image/png"},
                )
        time.sleep(3)
        pids = tree(server.process.pid)
        start_rss = rss(pids)
        start = dump_all(pids, out)
        began = time.monotonic()
        statuses = CASES[args.case](server)
        print(f"case {args.case}: {sorted(statuses)} in {time.monotonic() - began:.1f} s", flush=True)
        time.sleep(args.idle)
        idle_rss = rss(pids)
        idle = dump_all(pids, out)
        print(
            f"tree RSS start-up {start_rss / 2**20:.0f} MiB, {args.idle:g} s idle after the case {idle_rss / 2**20:.0f} MiB"
            f" = {idle_rss / start_rss:.2f}x; load {Path('/proc/loadavg').read_text().split()[:3]}"
        )
        for pid in pids:
            if pid in start and pid in idle:
                print(f"pid {pid} {' '.join(start[pid]['argv'])[-60:]}")
                print(summary("start-up", start[pid]))
                print(summary(f"{args.idle:g} s idle", idle[pid]))
                before, after = start[pid].get("types", {}), idle[pid].get("types", {})
                grown = sorted(((after.get(k, 0) - before.get(k, 0), k) for k in after), reverse=True)[:12]
                print("    gc-tracked objects grown: " + ", ".join(f"{k} {n:+d}" for n, k in grown if n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
