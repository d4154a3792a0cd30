"""Compare server settings side by side: several normserve servers, each with its own NORMSERVE_*
environment, driven in interleaved wrk rounds on one bench workload, next to raw in-process ORT.
Interleaving puts a change in the machine's load on every variant alike, which one bench run per
variant does not.

    python -m scripts.ab_layouts --workload classify --concurrency 32 \\
        default: 2x1:NORMSERVE_MODEL_INSTANCES=2,NORMSERVE_INTRA_OP_THREADS=1 1x2:NORMSERVE_MODEL_INSTANCES=1

Each VARIANT is `name:KEY=VALUE,KEY=VALUE` (empty after the colon: the defaults; `WORKERS=N` sets
the worker processes; `SERVER=naive` starts the bench's naive baseline app instead of normserve;
`CHECKOUT=DIR` runs the code of another checkout, e.g. a `git worktree` of the previous commit;
`PYTHON=PATH` runs it with another interpreter, such as that checkout's own .venv/bin/python).
Prints req/s and p99 per round, their medians, the req/s ratio to raw ORT's best layout
(`bench.raw`), and the servers' CPU time per answered request (user + system of all their
processes during the measured run; less sensitive than req/s to other load on a shared machine).
Each round starts with the next variant in turn, so no variant always follows the same one. The
README's layout table was measured with this script (two 6-s rounds).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from normserve.bench.payloads import WORKLOAD_NAMES, build_workloads
from normserve.bench.raw import RawOrt
from normserve.bench.servers import ServerProcess, start, stop
from normserve.bench.wrk import Wrk, find_wrk


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition(":")
    env = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    return name, env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+", help="name:KEY=VALUE,... (NORMSERVE_* settings, WORKERS=N)")
    p.add_argument("--workload", choices=WORKLOAD_NAMES, default="reconstruct512")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=6.0, help="seconds measured per round")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    args = p.parse_args(argv)

    workload = {w.name: w for w in build_workloads([args.workload])}[args.workload]
    variants = dict(parse_variant(v) for v in args.variants)
    wrk = Wrk(find_wrk())
    servers: dict[str, ServerProcess] = {}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    p99s: dict[str, list[float]] = {name: [] for name in variants}
    cpu_ms: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for name, env in variants.items():
            workers = int(env["WORKERS"]) if "WORKERS" in env else None
            env.pop("WORKERS", None)
            kind = env.pop("SERVER", "normserve")
            checkout = Path(env.pop("CHECKOUT")) if "CHECKOUT" in env else None
            python = env.pop("PYTHON", None)
            servers[name] = start(
                kind,
                Path(f"/tmp/ab_{name}.log"),
                repository=args.repository,
                workers=workers,
                env=env,
                checkout=checkout,
                python=python,
            )
        with RawOrt(args.repository, {}, 3.0) as raw:
            best = raw.measure(workload.model, workload.output, workload.tensor)
            print(f"raw ORT {best.best:.2f} img/s (batch {best.best_batch}, {best.layout[best.best_batch]})")
            names = list(servers)
            for k in range(args.rounds):
                for name in names[k % len(names) :] + names[: k % len(names)]:
                    server = servers[name]
                    wrk.run(server.base_url, workload, args.concurrency, 2)  # warm-up
                    cpu = server.cpu_seconds()
                    result = wrk.run(server.base_url, workload, args.concurrency, args.duration)
                    cpu_ms[name].append((server.cpu_seconds() - cpu) * 1000 / max(1, result.requests))
                    rates[name].append(result.rps)
                    p99s[name].append(result.latency_ms["p99"])
                print(
                    f"round {k + 1}: "
                    + "  ".join(
                        f"{n} {v[-1]:.2f} (p99 {p99s[n][-1]:.1f} ms, {cpu_ms[n][-1]:.3f} CPU ms/req)"
                        for n, v in rates.items()
                    ),
                    flush=True,
                )
    finally:
        for server in servers.values():
            stop(server)
    print(
        f"{args.workload} at c={args.concurrency}, medians of {args.rounds} rounds: req/s, its ratio to raw ORT's best, "
        "p99, server CPU per request"
    )
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"  {name:<16} {median:8.2f}  {median / best.best:.3f}  p99 {statistics.median(p99s[name]):7.1f} ms"
            f"  {statistics.median(cpu_ms[name]):.3f} CPU ms/req"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
