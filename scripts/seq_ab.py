"""Fresh server per trial, workloads in sequence (as `normserve bench` runs them), variants
interleaved: where does a workload measured after another one lose throughput?

    python -m scripts.seq_ab --sequence classify,v2 --rounds 4 \\
        old:CHECKOUT=/tmp/ab-old new:CHECKOUT=/tmp/new new-notrim:CHECKOUT=/tmp/new,NORMSERVE_MEMORY_TRIM_IDLE_S=0

VARIANT as in scripts/ab_layouts (`name:KEY=VALUE,...`; CHECKOUT, PYTHON, WORKERS,
SEQUENCE=v2 to run another sequence for this variant, IDLE=S to leave the server idle S seconds
after each warm-up, WARMUP=S for its own warm-up). Prints, per round and as medians,
req/s and server CPU ms per request of each workload.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from normserve.bench.payloads import build_workloads
from normserve.bench.servers import start, stop
from normserve.bench.wrk import Wrk, find_wrk
from scripts.ab_layouts import parse_variant


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--sequence", default="classify,v2")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--pause", type=float, default=0.0, help="seconds idle between workloads")
    args = p.parse_args(argv)
    variants = dict(parse_variant(v) for v in args.variants)
    names_all = {w for env in variants.values() for w in env.get("SEQUENCE", "").split("+") if w}
    names_all |= set(args.sequence.split(","))
    workloads = {w.name: w for w in build_workloads(sorted(names_all))}
    wrk = Wrk(find_wrk())
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    names = list(variants)
    for k in range(args.rounds):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            env = dict(variants[name])
            sequence = env.pop("SEQUENCE", args.sequence).replace("+", ",").split(",")
            checkout = Path(env.pop("CHECKOUT")) if "CHECKOUT" in env else None
            python = env.pop("PYTHON", None)
            if python is None and checkout is not None and (checkout / ".venv/bin/python").exists():
                python = str(checkout / ".venv/bin/python")
            workers = int(env.pop("WORKERS")) if "WORKERS" in env else None
            idle = float(env.pop("IDLE", 0))  # seconds idle after each warm-up, before the measured run
            warmup = float(env.pop("WARMUP", args.warmup))
            repository = (checkout or Path(".")) / "model_repository"
            server = start(
                "normserve",
                Path(f"/tmp/seq_{name}.log"),
                repository=repository,
                workers=workers,
                env=env,
                checkout=checkout,
                python=python,
            )
            line = []
            try:
                for i, wl in enumerate(sequence):
                    if i and args.pause:
                        time.sleep(args.pause)
                    workload = workloads[wl]
                    if warmup:
                        wrk.run(server.base_url, workload, args.concurrency, warmup)
                    time.sleep(idle)
                    cpu = server.cpu_seconds()
                    r = wrk.run(server.base_url, workload, args.concurrency, args.duration)
                    ms = (server.cpu_seconds() - cpu) * 1000 / max(1, r.requests)
                    results.setdefault((name, wl), []).append((r.rps, ms))
                    line.append(f"{wl} {r.rps:7.1f} req/s {ms:.3f} ms/req")
            finally:
                stop(server)
            load = Path("/proc/loadavg").read_text().split()[0]
            print(f"round {k + 1} {name:<14} " + "  ".join(line) + f"  (load {load})", flush=True)
    print("medians: req/s, server CPU ms/req")
    for (name, wl), values in results.items():
        rps = statistics.median(v[0] for v in values)
        ms = statistics.median(v[1] for v in values)
        print(f"  {name:<14} {wl:<16} {rps:8.1f}  {ms:.3f}  (n={len(values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
