"""`normserve bench` end to end at tiny scale: both servers started, driven, compared; JSON and
plot written."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from normserve.bench import cli
from normserve.bench.report import Target
from normserve.bench.wrk import Wrk


def test_bench_run_writes_json_and_plot(wrk: Wrk, tmp_path: Path, committed_model_repository: Path) -> None:
    out = tmp_path / "run"
    argv = ["--workloads", "classify", "--concurrency", "2", "--duration", "1", "--warmup", "0"]
    argv += ["--raw-seconds", "0.05", "--no-torch", "--overload", "--overload-concurrency", "8"]
    # A queue of 2 and no batching: c=2 fits, the overload run at c=8 must get 503s, and the drain
    # after it has to wait them out.
    argv += ["--server-env", "NORMSERVE_MAX_QUEUE_SIZE=2", "--server-env", "NORMSERVE_MAX_BATCH_SIZE=1"]
    argv += ["--repository", str(committed_model_repository), "--out", str(out)]
    assert cli.main(argv) == 0

    data = orjson.loads((out / "bench.json").read_bytes())
    assert data["meta"]["command"].startswith("normserve bench --workloads classify")
    assert data["meta"]["generator"].startswith("wrk")
    for server in ("normserve", "naive"):
        (point,) = data["points"][server]["classify"]
        assert point["concurrency"] == 2 and point["requests"] > 0 and point["error_count"] == 0
        assert point["server_cores"] > 0 and point["other_cores"] >= 0
        # each server process's CPU, largest first; they add up to the server's
        assert point["process_cpu_s"] == sorted(point["process_cpu_s"], reverse=True)
        assert sum(point["process_cpu_s"]) == pytest.approx(point["server_cpu_s"])
        assert point["busiest_share"] == pytest.approx(point["process_cpu_s"][0] / point["server_cpu_s"])
        assert point["statuses"] == {"200": point["requests"]}  # counted by default
    (raw,) = data["raw_ort"]["results"]
    assert (raw["model"], raw["side"]) == ("gncnn", 32) and raw["best_per_s"] > 0
    (cmp,) = data["comparisons"]
    assert cmp["rps_vs_naive"] > 0 and cmp["rps_vs_raw_best"] > 0
    ours, naive = data["overload"]
    assert (ours["server"], naive["server"]) == ("normserve", "naive")
    assert ours["concurrency"] == naive["concurrency"] == 8
    assert ours["rejected_503"] > 0 and ours["other_errors"] == 0
    assert set(ours["statuses"]) == {"200", "503"}
    assert 0 < ours["accepted_p99_ms"]["low"] <= ours["accepted_p99_ms"]["high"]
    assert naive["statuses"] == {"200": naive["requests"]}  # no queue limit: it only gets slower
    targets = {t["name"]: t for t in data["targets"]}
    assert len(targets) == 5
    # Measured here: nothing at c=32 or 512², no torch; each says so instead of inventing a value.
    assert {t["status"] for t in targets.values()} == {"n/a"}
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "normserve.log").exists() and (out / "naive.log").exists()


def test_targets_mark_disturbed_measurements() -> None:
    assert Target("t", 1.0, ">=", 0.8, "", other_cores=0.1).status == "PASS"
    assert Target("t", 1.0, ">=", 0.8, "", other_cores=0.9).status == "PASS*"
    assert Target("t", 0.7, "<=", 0.5, "", other_cores=None).status == "FAIL"
    assert Target("t", None, ">=", 0.8, "", other_cores=0.9).status == "n/a"


def test_bench_grpc_mode_compares_grpc_and_http(wrk: Wrk, tmp_path: Path, committed_model_repository: Path) -> None:
    """`--grpc`: HTTP binary (wrk) and gRPC with 1 and 2 client processes, interleaved, on one
    server; every call answered, the summary computed from what was measured."""
    out = tmp_path / "grpc"
    argv = ["--grpc", "--grpc-concurrency", "4", "--grpc-rounds", "1", "--duration", "1", "--warmup", "0.2"]
    argv += ["--workers", "1", "--repository", str(committed_model_repository), "--out", str(out)]
    assert cli.main(argv) == 0
    grpc = orjson.loads((out / "bench.json").read_bytes())["grpc"]
    sides = {m["side"]: m for m in grpc["measurements"]}
    assert set(sides) == {"http", "grpc x1", "grpc x2"}
    for m in sides.values():
        assert m["requests"] > 0 and m["errors"] == 0 and m["rps"] > 0
        assert m["latency_ms"]["p50"] > 0 and m["generator_cores"] > 0 and m["server_cores"] > 0
    summary = grpc["summary"]
    assert summary["grpc_over_http"] == max(sides["grpc x1"]["rps"], sides["grpc x2"]["rps"]) / sides["http"]["rps"]
    assert summary["more_clients_gain"] == sides["grpc x2"]["rps"] / sides["grpc x1"]["rps"] - 1
    per_core = {side: m["rps"] / m["server_cores"] for side, m in sides.items()}
    assert [sides[s]["per_server_core"] for s in per_core] == list(per_core.values())
    assert summary["grpc_over_http_per_server_core"] == pytest.approx(
        max(per_core["grpc x1"], per_core["grpc x2"]) / per_core["http"]
    )
    log = (out / "normserve.log").read_text()
    assert '"path":"/inference.GRPCInferenceService/ModelInfer"' in log  # the gRPC calls reached the server
