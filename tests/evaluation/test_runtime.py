"""evaluation/runtime.py's timing helpers for scripts that compare graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from normserve.evaluation import runtime
from normserve.evaluation.runtime import cpu_session, time_interleaved
from normserve.service.model import GRAPH_OPTIMIZATION


def test_time_interleaved_warms_up_then_alternates_and_takes_medians(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]  # a fake perf_counter that only the calls advance: no real timing in a unit test
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    order: list[str] = []
    durations = {"a": iter([9.0, 9.0, 9.0, 1.0, 3.0, 2.0]), "b": iter([9.0] * 3 + [4.0, 6.0, 5.0])}

    def call(key: str) -> None:
        order.append(key)
        clock[0] += next(durations[key])

    medians = time_interleaved({"a": lambda: call("a"), "b": lambda: call("b")}, rounds=3, warmup=3)
    assert order == ["a"] * 3 + ["b"] * 3 + ["a", "b"] * 3  # warm-up each, then alternate
    assert medians == {"a": 2.0, "b": 5.0}  # warm-up calls (9.0) are not timed


def test_cpu_session_is_the_services_optimisation_on_cpu(committed_model_repository: Path) -> None:
    path = committed_model_repository / "in_autoencoder" / "3" / "model.onnx"
    session = cpu_session(path, threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.graph_optimization_level == GRAPH_OPTIMIZATION  # the service's own level
    y = session.run(None, {"image": np.full((1, 3, 8, 8), 0.5, np.float32)})[0]
    assert y.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("rounds", [1, 5])
def test_time_interleaved_times_each_call_once_per_round(rounds: int) -> None:
    counts = {"x": 0, "y": 0}

    def bump(key: str) -> None:
        counts[key] += 1

    time_interleaved({k: (lambda k=k: bump(k)) for k in counts}, rounds=rounds, warmup=2)
    assert counts == {"x": rounds + 2, "y": rounds + 2}
