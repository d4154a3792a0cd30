"""Summarise an `scripts/ab_bench.sh` output folder: req/s of every run of each side, how the
server's CPU was spread over its processes, other work on the machine meanwhile, and the new/old
ratios of the medians (req/s, and server CPU per request), over all runs and over the clean ones.

    python -m scripts.ab_summary OUT [--balanced 0.75] [--quiet 0.25]

A run is clean when the load was spread over the workers and the machine was otherwise quiet:
- each worker listens on its own SO_REUSEPORT socket and the kernel picks one by a hash of the
  connection, so the 4 keep-alive connections of a c=4 run all land on one of two workers in
  some starts. That worker then does all the work with the other idle, and req/s drops by a fifth
  to a third on either side of a comparison (docs/design/workers.md). Balanced: the busiest
  process used at most `--balanced` of the server's CPU;
- other work (CPU that neither the server nor wrk used) takes cores from the server. Quiet: at
  most `--quiet` cores of it, as `normserve bench` marks its targets.
Server CPU per request is the steadier figure on a shared machine; req/s is what the issue's
throughput target names.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

from normserve.bench.raw import NOISY_OTHER_CORES


def _cell(point: dict[str, Any]) -> str:
    share, other = point.get("busiest_share"), point.get("other_cores")
    notes = [f"{share:.0%}" if share is not None else "", f"+{other:.2f}" if other and other > 0.05 else ""]
    return f"{point['rps']:.1f}" + (f" ({', '.join(n for n in notes if n)})" if any(notes) else "")


def _ms_per_request(point: dict[str, Any]) -> float:
    return 1000 * point["server_cpu_s"] / max(1, point["requests"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="the folder scripts/ab_bench.sh wrote")
    p.add_argument("--balanced", type=float, default=0.75, help="largest busiest-process CPU share of a clean run")
    p.add_argument("--quiet", type=float, default=NOISY_OTHER_CORES, help="most cores of other work in a clean run")
    args = p.parse_args(argv)
    runs = sorted(args.out.glob("*-*-*/bench.json"))
    if not runs:
        print(f"no runs under {args.out} (expected LABEL-ROUND-TAG/bench.json)")
        return 2
    # (workload, concurrency) -> side -> [(round, point)]
    table: dict[tuple[str, int], dict[str, list[tuple[int, dict[str, Any]]]]] = defaultdict(lambda: defaultdict(list))
    for path in runs:
        side, round_, _ = path.parent.name.split("-", 2)
        for workload, by_c in orjson.loads(path.read_bytes())["points"].get("normserve", {}).items():
            for point in by_c:
                table[workload, point["concurrency"]][side].append((int(round_), point))

    def clean(point: dict[str, Any]) -> bool:
        share, other = point.get("busiest_share"), point.get("other_cores")
        return share is not None and share <= args.balanced and other is not None and other <= args.quiet

    print("req/s per run (busiest process's CPU share, +cores of other work when over 0.05)")
    for (workload, c), sides in table.items():
        print(f"\n{workload} c={c}")
        for side in sorted(sides):
            print(f"  {side:<4} " + "  ".join(f"r{r} {_cell(pt)}" for r, pt in sorted(sides[side], key=lambda x: x[0])))
        for label, keep in (("all runs", lambda pt: True), ("clean runs", clean)):
            kept = {side: [pt for _, pt in runs_ if keep(pt)] for side, runs_ in sides.items()}
            if not (kept.get("old") and kept.get("new")):
                print(f"  {label}: not enough runs on both sides")
                continue
            rps = {s: statistics.median(pt["rps"] for pt in kept[s]) for s in ("old", "new")}
            cpu = {s: statistics.median(_ms_per_request(pt) for pt in kept[s]) for s in ("old", "new")}
            print(
                f"  {label} ({len(kept['old'])} old, {len(kept['new'])} new): req/s {rps['old']:.1f} -> {rps['new']:.1f}, "
                f"new/old {rps['new'] / rps['old']:.3f}; server CPU per request {cpu['old']:.3f} -> {cpu['new']:.3f} ms, "
                f"new/old {cpu['new'] / cpu['old']:.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
