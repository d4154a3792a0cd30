"""Page faults and CPU per request of one `normserve bench` workload, for several checkouts, on
real servers, interleaved: what the worker processes spend per request in minor page faults
(memory the kernel had to hand them, zeroed, because it was not kept), user and system CPU.

    python -m scripts.fault_ab --workload reconstruct512 old=/tmp/ab-old new=/tmp/new

Each round starts a fresh `normserve serve` (default settings, 2 workers) per checkout, in the
order given and reversed every other round, sends `--warmup` requests per client, then
`--requests` per client from `--concurrency` clients (threads of this process; the counts are
per request, so a client slower than wrk does not matter), and reads the server tree's
/proc/PID/stat before and after. A checkout is `NAME=TREE`; TREE's `.venv` runs its server when
it has one, this one's otherwise, and its own model_repository is served.

Faults and system CPU are a count and a cost that timing on a shared VM hides: ONNX Runtime's
arena kept between runs costs none, an arena given back after every run faults the next run's
activations in again (docs/limits-budgets.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from normserve.bench import servers
from normserve.bench.payloads import WORKLOAD_NAMES, Workload, build_workloads

FIELDS = ("minflt", "majflt", "user_ms", "sys_ms")
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")  # /proc/PID/stat counts CPU time in clock ticks


def _counters(server: servers.ServerProcess) -> dict[int, tuple[float, ...]]:
    """Per process of the server's tree: minor and major faults, user and system CPU (ms)."""
    out: dict[int, tuple[float, ...]] = {}
    for p in server.processes():
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[p.pid] = (int(fields[7]), int(fields[9]), int(fields[11]) * TICK_MS, int(fields[12]) * TICK_MS)
    return out


def _drive(server: servers.ServerProcess, workload: Workload, clients: int, each: int) -> tuple[float, list[int]]:
    bad: list[int] = []

    def client() -> None:
        for _ in range(each):
            status, _, _ = servers.post(server.base_url, workload.path, workload.body, workload.headers, timeout=120)
            if status != 200:
                bad.append(status)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, bad


def _one(name: str, tree: Path, workload: Workload, args: argparse.Namespace, log: Path) -> dict[str, float]:
    python = tree / ".venv" / "bin" / "python"
    server = servers.start(
        "normserve",
        log,
        repository=tree / "model_repository",
        checkout=tree,
        python=str(python) if python.exists() else None,
    )
    try:
        _drive(server, workload, args.concurrency, args.warmup)
        before = _counters(server)
        wall, bad = _drive(server, workload, args.concurrency, args.requests)
        after = _counters(server)
    finally:
        servers.stop(server)
    if bad:
        raise SystemExit(f"{name}: {len(bad)} answers were not 200 ({sorted(set(bad))}); server log: {log}")
    n = args.concurrency * args.requests
    totals = [sum(after[p][i] - before[p][i] for p in after if p in before) for i in range(len(FIELDS))]
    return {"req_s": n / wall, **{f: t / n for f, t in zip(FIELDS, totals, strict=True)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkouts", nargs="+", help="NAME=TREE")
    p.add_argument("--workload", default="reconstruct512", choices=WORKLOAD_NAMES)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=10, help="per client, counted")
    p.add_argument("--warmup", type=int, default=3, help="per client, before counting")
    p.add_argument("--logs", type=Path, default=Path("runs/fault_ab"))
    args = p.parse_args(argv)
    trees: dict[str, Path] = {}
    for spec in args.checkouts:
        name, sep, tree = spec.partition("=")
        if not sep or not Path(tree, "model_repository").is_dir():
            p.error(f"{spec!r}: give NAME=TREE, a checkout with its model_repository")
        trees[name] = Path(tree).resolve()
    (workload,) = build_workloads([args.workload])
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in list(trees) if r % 2 == 0 else list(reversed(trees)):
            got = _one(name, trees[name], workload, args, args.logs / f"{name}-{r}.log")
            rows[name].append(got)
            print(
                f"round {r + 1} {name}: {got['req_s']:.2f} req/s, per request {got['minflt']:,.0f} minor faults, "
                f"user {got['user_ms']:.1f} ms, sys {got['sys_ms']:.1f} ms",
                flush=True,
            )
    first = next(iter(trees))
    print(f"\nmedians over {args.rounds} rounds, {args.workload} at c={args.concurrency} (ratio to {first}):")
    base = {f: statistics.median(x[f] for x in rows[first]) for f in ("req_s", *FIELDS)}
    for name, runs in rows.items():
        med = {f: statistics.median(x[f] for x in runs) for f in ("req_s", *FIELDS)}
        parts = [f"{med['req_s']:.2f} req/s ({med['req_s'] / base['req_s']:.3f})"]
        for f in ("minflt", "user_ms", "sys_ms"):
            ratio = med[f] / base[f] if base[f] else float("nan")
            parts.append(f"{f} {med[f]:,.1f} ({ratio:.2f})")
        print(f"  {name}: " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
