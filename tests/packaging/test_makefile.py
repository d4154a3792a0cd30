"""`make serve` binds what the README's settings table says: NORMSERVE_HOST / NORMSERVE_PORT when
set, else 127.0.0.1:8000; the Makefile passes --host/--port only when HOST=/PORT= are given. (The
container binds 0.0.0.0 on purpose, through NORMSERVE_HOST in its image.)"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from normserve.service.settings import Settings

MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def _dry_run(repo_root: Path, *variables: str) -> str:
    """The `normserve serve` line `make serve` would run (nothing is run; .venv is taken as built)."""
    out = subprocess.run(
        [str(MAKE), "-n", "-o", ".venv/.runtime", "serve", *variables],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (line,) = [line for line in out.splitlines() if "normserve serve" in line]
    return line


def test_serve_leaves_the_address_to_the_settings(repo_root: Path) -> None:
    line = _dry_run(repo_root)
    assert "--host" not in line and "--port" not in line and "0.0.0.0" not in line, line
    assert (Settings.model_fields["host"].default, Settings.model_fields["port"].default) == ("127.0.0.1", 8000)


def test_host_and_port_variables_still_override(repo_root: Path) -> None:
    assert _dry_run(repo_root, "HOST=0.0.0.0", "PORT=8080").endswith("--host 0.0.0.0 --port 8080")


def _listening(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (IPv4, from /proc/net/tcp)."""
    found = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = row.split()[1], row.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="needs Linux's /proc/net/tcp")
def test_make_serve_binds_loopback_and_honours_normserve_port(repo_root: Path, tmp_path: Path) -> None:
    if not (repo_root / ".venv" / "bin" / "normserve").is_file():
        pytest.skip("needs the checkout's .venv (make .venv/.dev)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")}
    env |= {"NORMSERVE_PORT": str(port), "NORMSERVE_WORKERS": "1", "NORMSERVE_LOG_LEVEL": "warning"}
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [str(MAKE), "-o", ".venv/.runtime", "serve"],
        cwd=repo_root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # make and the server it starts: one process group to stop
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "serve.log").read_text())
        assert _listening(port) == {"127.0.0.1"}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        log.close()
