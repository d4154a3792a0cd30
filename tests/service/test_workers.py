"""Several worker processes: each is marked ready in the server's runtime folder, the server is
ready only when all of them are, and each listens on a socket of its own (SO_REUSEPORT) so the
kernel spreads connections evenly over them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import ClientFactory
from servers import REPO_ROOT, running_server

from normserve.service.settings import usable_cpus
from normserve.service.shutdown import REUSE_PORT
from normserve.service.workers import MARK_PREFIX, WorkerRoster

WAIT_S = 10.0


def _mark_in_another_process(directory: Path) -> subprocess.Popen[str]:
    code = (
        "import sys; from pathlib import Path; from normserve.service.workers import WorkerRoster\n"
        f"WorkerRoster(Path({str(directory)!r})).mark_ready(); print('marked', flush=True); sys.stdin.readline()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "marked"
    return process


def test_marks_count_live_workers_only(tmp_path: Path) -> None:
    roster = WorkerRoster(tmp_path)
    assert roster.ready_count() == 0
    roster.mark_ready()
    roster.mark_ready()  # once per worker
    other = _mark_in_another_process(tmp_path)
    try:
        assert roster.ready_count() == 2
    finally:
        other.kill()
        other.wait(WAIT_S)
    assert roster.ready_count() == 1  # a worker that died is not counted, and its mark goes
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(MARK_PREFIX)] == [f"{MARK_PREFIX}{os.getpid()}"]
    roster.leave()
    assert roster.ready_count() == 0


def test_the_server_is_ready_when_every_worker_is(app_client: ClientFactory, tmp_path: Path) -> None:
    # As the second of two workers sees it: itself up, the other one still loading.
    client = app_client(allow_503=True, workers=2, runtime_dir=tmp_path)
    response = client.get("/v2/health/ready")
    assert response.status_code == 503
    body = response.json()
    assert (body["ready"], body["workers"], body["workers_ready"]) == (False, 2, 1)
    assert body["reason"] == "1 of 2 worker processes are ready"
    assert all(m["ready"] for m in body["models"])
    other = _mark_in_another_process(tmp_path)  # the other worker is up
    try:
        response = client.get("/v2/health/ready")
        assert response.status_code == 200 and response.json()["workers_ready"] == 2
    finally:
        other.kill()
        other.wait(WAIT_S)
    assert client.get("/v2/health/ready").status_code == 503  # and gone again


def _sockets_per_worker(server_pid: int, port: int, status: str) -> dict[int, list[str]]:
    """Per worker process: its sockets on `port` in `status`, as kernel socket ids."""
    workers = psutil.Process(server_pid).children()
    found: dict[int, list[str]] = {w.pid: [] for w in workers if "spawn_main" in " ".join(w.cmdline())}
    for pid in found:  # (not multiprocessing's resource tracker)
        for c in psutil.Process(pid).net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.status == status:
                found[pid].append(os.readlink(f"/proc/{pid}/fd/{c.fd}"))
    return found


@pytest.mark.e2e
@pytest.mark.skipif(not REUSE_PORT, reason="SO_REUSEPORT balancing is Linux's")
def test_two_workers_listen_on_their_own_sockets_and_share_the_connections(tmp_path: Path) -> None:
    with running_server(tmp_path / "server.log", "--workers", "2") as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        ready = httpx.get(f"{server.base_url}/v2/health/ready").json()
        assert (ready["workers"], ready["workers_ready"]) == (2, 2)  # ready means both are up
        listening = _sockets_per_worker(server.process.pid, port, psutil.CONN_LISTEN)
        assert [len(v) for v in listening.values()] == [1, 1], listening
        assert len({v[0] for v in listening.values()}) == 2, f"the workers share one socket: {listening}"
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        try:
            deadline = time.monotonic() + WAIT_S
            while True:  # accepted by the workers' loops
                spread = {
                    pid: len(v)
                    for pid, v in _sockets_per_worker(server.process.pid, port, psutil.CONN_ESTABLISHED).items()
                }
                if sum(spread.values()) == 32 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            # A hash of each client port picks the worker: 4 or fewer of 32 on one side has a
            # chance of about 1 in 50,000 (one shared socket put all 32 on one worker in 1 start of 6).
            assert sum(spread.values()) == 32 and min(spread.values()) > 4, spread
        finally:
            for s in sockets:
                s.close()
        assert httpx.get(f"{server.base_url}/v2/health/live").status_code == 200


@pytest.mark.e2e
def test_serve_starts_one_worker_per_cpu_up_to_two_by_default(tmp_path: Path) -> None:
    with running_server(tmp_path / "server.log") as server:  # no --workers, no NORMSERVE_WORKERS
        ready = httpx.get(f"{server.base_url}/v2/health/ready").json()
        expected = min(2, usable_cpus())
        assert (ready["workers"], ready["workers_ready"]) == (expected, expected)
    with running_server(tmp_path / "one.log", env={"NORMSERVE_WORKERS": "1"}) as server:  # told: one
        assert httpx.get(f"{server.base_url}/v2/health/ready").json()["workers"] == 1
