"""Start the real `normserve serve` in a subprocess on a free port, for tests over a socket.

One implementation for every end-to-end test: the server logs to a file (a full pipe would
block it), readiness is polled on /v2/health/ready, and teardown leaves no process behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
# Serve another checkout's code and models (this interpreter, that folder first on sys.path):
# before/after measurements such as scripts/adversarial.sh --before. Tests leave it unset.
SERVER_TREE = Path(os.environ.get("NORMSERVE_TEST_SERVER_TREE", REPO_ROOT))
READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path
    grpc_port: int | None = None

    @property
    def grpc_address(self) -> str:
        """host:port of the gRPC endpoint, as tritonclient.grpc takes it."""
        assert self.grpc_port is not None, "this server runs without gRPC"
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def address(self) -> str:
        """host:port, as tritonclient takes it."""
        return self.base_url.removeprefix("http://")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(log: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    """Start `normserve serve` on the committed repository (NORMSERVE_* from the caller's
    environment are dropped; pass settings in `env`) and wait until it is ready. gRPC listens on
    a free port of its own (`Server.grpc_address`) unless `env` says otherwise."""
    port = free_port()
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    full_env["NORMSERVE_GRPC_PORT"] = str(free_port())
    full_env.update(env or {})
    grpc_on = full_env.get("NORMSERVE_GRPC", "true").lower() not in ("0", "false", "no", "off")
    command = [sys.executable, "-m", "normserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--model-repository", str(SERVER_TREE / "model_repository"), *args]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=SERVER_TREE, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log, int(full_env["NORMSERVE_GRPC_PORT"]) if grpc_on else None)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode} before ready:\n{server.log_text()}")
        try:
            if httpx.get(f"{server.base_url}/v2/health/ready", timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.1)
    stop_server(server)
    raise AssertionError(f"server not ready within {READY_TIMEOUT_S}s:\n{server.log_text()}")


def stop_server(server: Server) -> None:
    """Teardown: whatever state the server is in, leave no process behind."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)


@contextmanager
def running_server(log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = start_server(log, *args, env=env)
    try:
        yield server
    finally:
        stop_server(server)
