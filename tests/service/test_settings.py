"""Settings derived at start-up."""

from __future__ import annotations

import os

import pytest

from service.settings import Settings


@pytest.mark.parametrize(("allowed", "workers", "expected"), [({0}, 1, 1), ({0, 1, 2, 3}, 1, 4), ({0, 1, 2, 3}, 2, 2)])
def test_default_ort_threads_follow_the_cpus_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch, allowed: set[int], workers: int, expected: int
) -> None:
    # Under taskset or a cgroup cpuset the machine has more CPUs than the process may use.
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: allowed)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert Settings(workers=workers).ort_intra_threads() == expected


def test_explicit_ort_threads_win() -> None:
    assert Settings(intra_op_threads=3, workers=2).ort_intra_threads() == 3
