"""What a bench run found: the tables, the ratios the targets name (PASS/FAIL), JSON and a plot."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normserve.bench.args import SERVERS
from normserve.bench.payloads import Workload
from normserve.bench.raw import NOISY_OTHER_CORES, RawResult, TorchComparison
from normserve.bench.soak import SoakResult
from normserve.bench.wrk import WrkResult

log = logging.getLogger("normserve.bench")


@dataclass
class Target:
    name: str
    value: float | None  # None: not measured in this run
    op: str  # ">=" or "<="
    threshold: float
    detail: str
    other_cores: float | None = None  # the most CPU other work used during the measurements behind it

    @property
    def noisy(self) -> bool:
        return self.other_cores is not None and self.other_cores > NOISY_OTHER_CORES

    @property
    def status(self) -> str:
        """PASS or FAIL; with a `*` when other work on the machine disturbed the measurement."""
        if self.value is None:
            return "n/a"
        ok = self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold
        return ("PASS" if ok else "FAIL") + ("*" if self.noisy else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "target": f"{self.op} {self.threshold:g}",
            "status": self.status,
            "detail": self.detail,
            "other_cores": self.other_cores,
        }


@dataclass
class Overload:
    server: str
    capacity_rps: float  # best req/s of the sweep
    saturating_concurrency: int  # smallest swept concurrency reaching 90 % of it
    result: WrkResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "capacity_rps": self.capacity_rps,
            "saturating_concurrency": self.saturating_concurrency,
            **self.result.to_dict(),
        }


@dataclass
class BenchRun:
    meta: dict[str, Any]
    workloads: list[Workload]
    raw: dict[tuple[str, int], RawResult] = field(default_factory=dict)
    raw_info: dict[str, Any] = field(default_factory=dict)
    torch: list[TorchComparison] | str | None = None
    points: dict[str, dict[str, dict[int, WrkResult]]] = field(default_factory=dict)  # server/workload/conc
    overload: list[Overload] = field(default_factory=list)
    soak: SoakResult | None = None
    grpc: Any = None  # grpc_bench.GrpcComparison, in `--grpc` mode

    def point(self, server: str, workload: str, concurrency: int) -> WrkResult | None:
        return self.points.get(server, {}).get(workload, {}).get(concurrency)

    def raw_for(self, w: Workload) -> RawResult | None:
        return self.raw.get((w.model, w.image_side))

    # -- ratios ------------------------------------------------------------------------------
    def targets(self) -> list[Target]:
        out: list[Target] = []
        rec = self.point("normserve", "reconstruct512", 4)
        raw512 = self.raw.get(("in_autoencoder", 512))
        value = rec.rps / raw512.best if rec and raw512 else None
        detail = (
            f"{rec.rps:.1f} req/s vs raw ORT {raw512.best:.1f} img/s (batch {raw512.best_batch}; batch 1: "
            f"{raw512.batch1:.1f})"
            if rec and raw512
            else "needs reconstruct512 at concurrency 4 and the raw ORT measurement"
        )
        other = _most(rec.other_cores if rec else None, *(raw512.other_cores.values() if raw512 else ()))
        out.append(Target("/reconstruct 512² @ c=4: normserve / raw ORT throughput", value, ">=", 0.8, detail, other))

        ns, nv = self.point("normserve", "classify", 32), self.point("naive", "classify", 32)
        other = _most(ns.other_cores if ns else None, nv.other_cores if nv else None)
        out.append(
            Target(
                "/classify @ c=32: normserve / naive throughput",
                ns.rps / nv.rps if ns and nv and nv.rps else None,
                ">=",
                1.25,
                f"{ns.rps:.1f} vs {nv.rps:.1f} req/s"
                if ns and nv
                else "needs classify at concurrency 32 on both servers",
                other,
            )
        )
        out.append(
            Target(
                "/classify @ c=32: normserve p99 / naive p99",
                ns.latency_ms["p99"] / nv.latency_ms["p99"] if ns and nv and nv.latency_ms["p99"] else None,
                "<=",
                0.5,
                f"{ns.latency_ms['p99']:.1f} vs {nv.latency_ms['p99']:.1f} ms" if ns and nv else "",
                other,
            )
        )
        torch_cases = (
            {(t.model, t.shape[0], t.shape[-1]): t for t in self.torch if t.served}
            if isinstance(self.torch, list)
            else {}
        )
        for key, label in (
            (("gncnn", 32, 32), "ORT / torch eager: classifier, batch 32"),
            (("in_autoencoder", 1, 256), "ORT / torch eager: denoiser, 256², batch 1"),
        ):
            t = torch_cases.get(key)
            detail = (
                f"ORT ({t.precision}, v{t.version}) {t.ort_ms:.2f} vs {t.torch_ms:.2f} ms per run"
                if t
                else str(self.torch or "not run")
            )
            out.append(Target(label, t.speedup if t else None, ">=", 1.5, detail, t.other_cores if t else None))
        return out

    def comparisons(self) -> list[dict[str, Any]]:
        """normserve against naive and against raw ORT, for every workload × concurrency."""
        rows = []
        for w in self.workloads:
            raw = self.raw_for(w)
            for c, ns in sorted(self.points.get("normserve", {}).get(w.name, {}).items()):
                nv = self.point("naive", w.name, c)
                rows.append(
                    {
                        "workload": w.name,
                        "concurrency": c,
                        "rps_vs_naive": ns.rps / nv.rps if nv and nv.rps else None,
                        "p99_vs_naive": ns.latency_ms["p99"] / nv.latency_ms["p99"]
                        if nv and nv.latency_ms["p99"]
                        else None,
                        "rps_vs_raw_batch1": ns.rps / raw.batch1 if raw else None,
                        "rps_vs_raw_best": ns.rps / raw.best if raw else None,
                    }
                )
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "workloads": [
                {"name": w.name, "path": w.path, "description": w.description, "body_bytes": len(w.body)}
                for w in self.workloads
            ],
            "raw_ort": {
                "settings": self.raw_info,
                "results": [r.to_dict() for r in self.raw.values()],
            },
            "ort_vs_torch": [t.to_dict() for t in self.torch] if isinstance(self.torch, list) else self.torch,
            "points": {
                server: {w: [r.to_dict() for _, r in sorted(by_c.items())] for w, by_c in by_w.items()}
                for server, by_w in self.points.items()
            },
            "comparisons": self.comparisons(),
            "overload": [o.to_dict() for o in self.overload],
            "targets": [t.to_dict() for t in self.targets()] if self.points or self.raw or self.torch else [],
            "soak": self.soak.to_dict() if self.soak else None,
            "grpc": self.grpc.to_dict() if self.grpc else None,
        }


def _most(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


# -- printing --------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def point_row(server: str, r: WrkResult) -> str:
    lat = r.latency_ms
    rejected = "-" if r.rejected_503 is None else str(r.rejected_503)
    head = f"  {server:<10} {r.concurrency:>5}"
    if r.requests == 0:
        return f"{head} {'no answer within the run':>39} {r.error_count:>7} {rejected:>5}"
    return (
        f"{head} {r.rps:>9.1f} {lat['p50']:>9.2f} {lat['p95']:>9.2f} {lat['p99']:>9.2f} {r.error_count:>7} "
        f"{rejected:>5} {_fmt(r.server_cores):>7} {_fmt(r.busiest_share):>8} {_fmt(r.generator_cores):>6} "
        f"{_fmt(r.other_cores):>6}"
        + ("" if r.steady else "  * fewer than 3 answers per connection: not a steady state, lengthen --duration")
    )


POINT_HEADER = (
    f"  {'server':<10} {'conc':>5} {'req/s':>9} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'errors':>7} {'503':>5} "
    f"{'server':>7} {'busiest':>8} {'wrk':>6} {'other':>6}   (errors: HTTP >= 400 and socket errors, 503s "
    "among them; CPU cores used by the server, its busiest process's share of them, wrk, everything else)"
)


def print_raw(run: BenchRun) -> None:
    if not run.raw:
        return
    print(f"\nRaw in-process ORT, images/s and ms per run, the better layout (streams x threads) ({run.raw_info}):")
    for r in run.raw.values():
        per = "  ".join(
            f"b{b}: {v:.1f}/s ({r.ms_per_run[b]:.2f} ms, {r.layout.get(b, '?')})" for b, v in r.per_batch.items()
        )
        print(
            f"  {r.model:<15} {r.side:>4}²  {per}   best {r.best:.1f} img/s at batch {r.best_batch}"
            f"  (other work: up to {max(r.other_cores.values()):.2f} cores)"
        )
        for layout, rates in r.by_layout.items():
            print(f"  {'':<15} {'':>5}  {layout}: " + "  ".join(f"b{b}: {v:.1f}/s" for b, v in rates.items()))


def print_torch(run: BenchRun) -> None:
    if run.torch is None:
        return
    print("\nORT vs PyTorch eager (same module, input and threads):")
    if isinstance(run.torch, str):
        print(f"  {run.torch}")
        return
    for t in run.torch:
        shape = "×".join(map(str, t.shape))
        graph = f"v{t.version} {t.precision}" + ("" if t.served else ", not served")
        print(
            f"  {t.model:<15} {shape:<14} ORT {t.ort_ms:8.2f} ms  torch {t.torch_ms:8.2f} ms  ORT/torch {t.speedup:5.2f}×"
            f"  ({graph}; other work: {t.other_cores:.2f} cores)"
        )


def print_points(run: BenchRun) -> None:
    for w in run.workloads:
        raw = run.raw_for(w)
        print(f"\n{w.name}: {w.description} ({len(w.body)} bytes)")
        if raw:
            print(f"  raw ORT: batch 1 {raw.batch1:.1f}/s, best {raw.best:.1f}/s at batch {raw.best_batch}")
        print(POINT_HEADER)
        for server in SERVERS:
            for _, r in sorted(run.points.get(server, {}).get(w.name, {}).items()):
                print(point_row(server, r))


def print_comparisons(run: BenchRun) -> None:
    rows = run.comparisons()
    if not rows:
        return
    print("\nRatios, normserve over naive and over raw ORT (req/s; p99 lower is better):")
    print(f"  {'workload':<15} {'conc':>5} {'rps/naive':>10} {'p99/naive':>10} {'rps/raw b1':>11} {'rps/raw best':>13}")
    for r in rows:
        print(
            f"  {r['workload']:<15} {r['concurrency']:>5} {_fmt(r['rps_vs_naive']):>10} {_fmt(r['p99_vs_naive']):>10} "
            f"{_fmt(r['rps_vs_raw_batch1']):>11} {_fmt(r['rps_vs_raw_best']):>13}"
        )


def print_overload(run: BenchRun) -> None:
    for o in run.overload:
        r = o.result
        acc = r.accepted_p99_ms or {}
        print(
            f"\nOverload, {o.server} /classify: capacity {o.capacity_rps:.1f} req/s (saturated at c={o.saturating_concurrency}); "
            f"driven at c={r.concurrency}"
        )
        print(
            f"  {r.rps:.1f} req/s answered, {r.requests} responses, 503: {r.rejected_503}, other errors: "
            f"{r.error_count - (r.rejected_503 or 0)} ({r.errors}); all responses p50 {r.latency_ms['p50']:.1f} / "
            f"p99 {r.latency_ms['p99']:.1f} ms; accepted p99 between {_fmt(acc.get('low'), '.1f')} and "
            f"{_fmt(acc.get('high'), '.1f')} ms"
        )


def print_targets(run: BenchRun) -> None:
    print("\nTargets:")
    targets = run.targets()
    for t in targets:
        print(f"  [{t.status:>5}] {t.name}: {_fmt(t.value)} (target {t.op} {t.threshold:g}) {t.detail}")
    if any(t.noisy for t in targets):
        print(
            f"  * other work on the machine used more than {NOISY_OTHER_CORES:g} cores during a measurement this "
            "ratio rests on (see the 'other' columns): rerun on a quiet machine before trusting it"
        )


def print_soak(result: SoakResult) -> None:
    d = result.to_dict()
    print(
        f"\nSoak: {result.workload} at c={result.concurrency} for {result.duration_s:.0f}s: {result.requests} requests "
        f"({d['rps']:.1f} req/s), {result.errors} errors; RSS {d['rss_mb']['start']:.1f} MB at start, "
        f"{d['rss_mb']['baseline']:.1f} after the first interval, {d['rss_mb']['end']:.1f} at the end "
        f"(max {d['rss_mb']['max']:.1f}): growth {result.rss_growth:+.1%}  [{'PASS' if result.passed else 'FAIL'}: "
        f"{d['target']}]"
    )


# -- plot ------------------------------------------------------------------------------------
def plot(run: BenchRun, path: Path) -> Path | str:
    """Throughput and p99 against concurrency, both servers, one column per workload; raw ORT as
    horizontal lines. Returns the path, or why no plot was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return "no plot: matplotlib is not installed (pip install 'normserve[bench]')"
    workloads = [w for w in run.workloads if any(w.name in run.points.get(s, {}) for s in SERVERS)]
    if not workloads:
        return "no plot: no load points measured"
    fig, axes = plt.subplots(2, len(workloads), figsize=(4.2 * len(workloads), 7), squeeze=False)
    styles = {"normserve": ("tab:blue", "o"), "naive": ("tab:orange", "s")}
    for col, w in enumerate(workloads):
        top, bottom = axes[0][col], axes[1][col]
        for server in SERVERS:
            pts = [(c, r) for c, r in sorted(run.points.get(server, {}).get(w.name, {}).items()) if r.requests]
            if not pts:
                continue
            color, marker = styles[server]
            cs = [c for c, _ in pts]
            top.plot(cs, [r.rps for _, r in pts], marker=marker, color=color, label=server)
            bottom.plot(cs, [r.latency_ms["p99"] for _, r in pts], marker=marker, color=color, label=server)
        raw = run.raw_for(w)
        if raw:
            top.axhline(raw.batch1, color="gray", linestyle=":", label="raw ORT batch 1")
            top.axhline(raw.best, color="black", linestyle="--", label=f"raw ORT batch {raw.best_batch}")
        top.set_title(w.name)
        concurrencies = sorted({c for s in SERVERS for c in run.points.get(s, {}).get(w.name, {})})
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
            ax.set_xlabel("concurrency (wrk connections)")
            ax.grid(True, alpha=0.3)
        top.set_ylabel("req/s")
        top.set_ylim(bottom=0)
        bottom.set_ylabel("p99 latency (ms)")
        bottom.set_yscale("log")
        top.legend(fontsize="small")
    fig.suptitle(f"normserve bench ({run.meta.get('generator', 'wrk')})", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
