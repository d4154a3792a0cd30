"""Soak: a fixed concurrency for a long time, counting errors and watching the server's memory.

The run is cut into intervals, one wrk run each (statuses counted, so every non-2xx shows), and
the server's resident memory (the process tree: uvicorn's workers included) is sampled once a
second. RSS growth is measured from the end of the first interval (allocator pools and ORT's
arenas fill on the first requests) to the end of the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from normserve.bench.payloads import Workload
from normserve.bench.servers import ServerProcess
from normserve.bench.wrk import Wrk, WrkResult

RSS_TARGET_GROWTH = 0.10


@dataclass
class SoakResult:
    workload: str
    concurrency: int
    duration_s: float
    intervals: list[WrkResult] = field(default_factory=list)
    interval_ends_s: list[float] = field(default_factory=list)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    rss_start: int = 0  # before any load
    rss_baseline: int = 0  # after the first interval

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.intervals)

    @property
    def errors(self) -> int:
        return sum(r.error_count for r in self.intervals)

    @property
    def rss_end(self) -> int:
        return self.rss_samples[-1][1] if self.rss_samples else 0

    @property
    def rss_max(self) -> int:
        return max((b for _, b in self.rss_samples), default=0)

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_baseline) / self.rss_baseline if self.rss_baseline else 0.0

    @property
    def passed(self) -> bool:
        return self.errors == 0 and self.rss_growth < RSS_TARGET_GROWTH

    def to_dict(self) -> dict[str, Any]:
        mb = 1024 * 1024
        return {
            "workload": self.workload,
            "concurrency": self.concurrency,
            "duration_s": self.duration_s,
            "requests": self.requests,
            "rps": self.requests / self.duration_s if self.duration_s else 0.0,
            "errors": self.errors,
            "rss_mb": {
                "start": self.rss_start / mb,
                "baseline": self.rss_baseline / mb,
                "end": self.rss_end / mb,
                "max": self.rss_max / mb,
            },
            "rss_growth": self.rss_growth,
            "target": f"0 errors and RSS growth < {RSS_TARGET_GROWTH:.0%}",
            "passed": self.passed,
            "rss_samples": [{"t_s": round(t, 2), "rss_mb": b / mb} for t, b in self.rss_samples],
            "intervals": [
                {"end_s": round(end, 2), **r.to_dict()}
                for end, r in zip(self.interval_ends_s, self.intervals, strict=True)
            ],
        }


def soak(
    server: ServerProcess,
    workload: Workload,
    wrk: Wrk,
    *,
    concurrency: int,
    duration_s: float,
    interval_s: float = 30.0,
    sample_every_s: float = 1.0,
    progress: bool = True,
) -> SoakResult:
    if interval_s < 1 or duration_s < 1:
        raise ValueError("soak intervals and duration are whole seconds, at least 1 (wrk's resolution)")
    full, rest = divmod(round(duration_s), round(interval_s))
    lengths = [round(interval_s)] * full + ([rest] if rest else [])
    result = SoakResult(workload.name, concurrency, duration_s, rss_start=server.rss_bytes())
    started = time.monotonic()
    for length in lengths:
        run = wrk.start(server.base_url, workload, concurrency, length, count_statuses=True)
        while not run.finished_within(sample_every_s):
            result.rss_samples.append((time.monotonic() - started, server.rss_bytes()))
        interval = run.wait()
        now = time.monotonic() - started
        result.intervals.append(interval)
        result.interval_ends_s.append(now)
        result.rss_samples.append((now, server.rss_bytes()))
        if len(result.intervals) == 1:
            result.rss_baseline = result.rss_samples[-1][1]
        if progress:
            print(
                f"  soak {now:7.1f}s  {interval.rps:8.1f} req/s  p99 {interval.latency_ms['p99']:8.1f} ms  "
                f"errors {interval.error_count}  rss {result.rss_samples[-1][1] / 2**20:7.1f} MB",
                flush=True,
            )
    result.duration_s = time.monotonic() - started
    return result
