"""Fixtures for the bench tests: wrk (skip with the reason when it is missing; `make test`
installs it), the bench's workloads, and the two servers under test, started as the bench
starts them (real subprocesses on the committed model repository)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from normserve.bench.payloads import Workload, build_workloads
from normserve.bench.servers import ServerProcess, start, stop
from normserve.bench.wrk import Wrk


@pytest.fixture(scope="session")
def wrk() -> Wrk:
    path = shutil.which("wrk")
    if path is None:
        pytest.skip("wrk is not installed (bash scripts/install-wrk.sh, or make test, installs it)")
    return Wrk(path, threads=1, timeout_s=10.0)


@pytest.fixture(scope="session")
def workloads() -> dict[str, Workload]:
    return {w.name: w for w in build_workloads()}


def _server(name: str, tmp: Path, repository: Path) -> Iterator[ServerProcess]:
    server = start(name, tmp / f"{name}.log", repository=repository)
    try:
        yield server
    finally:
        stop(server)


@pytest.fixture(scope="session")
def normserve_server(
    tmp_path_factory: pytest.TempPathFactory, committed_model_repository: Path
) -> Iterator[ServerProcess]:
    yield from _server("normserve", tmp_path_factory.mktemp("normserve"), committed_model_repository)


@pytest.fixture(scope="session")
def naive_server(tmp_path_factory: pytest.TempPathFactory, committed_model_repository: Path) -> Iterator[ServerProcess]:
    yield from _server("naive", tmp_path_factory.mktemp("naive"), committed_model_repository)
