"""The soak loop at tiny scale: intervals of real load, errors counted, RSS sampled."""

from __future__ import annotations

from normserve.bench.payloads import Workload
from normserve.bench.servers import ServerProcess
from normserve.bench.soak import soak
from normserve.bench.wrk import Wrk


def test_soak_reports_errors_and_rss_over_time(
    wrk: Wrk, normserve_server: ServerProcess, workloads: dict[str, Workload]
) -> None:
    result = soak(
        normserve_server,
        workloads["classify"],
        wrk,
        concurrency=2,
        duration_s=2.0,
        interval_s=1.0,
        sample_every_s=0.25,
        progress=False,
    )
    assert len(result.intervals) == 2
    assert result.requests > 0 and result.errors == 0
    assert all(r.statuses == {200: r.requests} for r in result.intervals)
    times = [t for t, _ in result.rss_samples]
    assert len(times) >= 4 and times == sorted(times)
    assert all(rss > 20 * 2**20 for _, rss in result.rss_samples)  # a Python + ORT server, in bytes
    assert result.rss_start > 0 and result.rss_baseline > 0
    d = result.to_dict()
    assert d["errors"] == 0 and len(d["rss_samples"]) == len(result.rss_samples)
    assert d["rss_growth"] == result.rss_growth and isinstance(d["passed"], bool)
