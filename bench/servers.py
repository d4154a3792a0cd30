"""Start the servers under test the same way: a subprocess of this Python (so the same uvicorn,
FastAPI and onnxruntime), on 127.0.0.1 and a free port, logging to a file (a full pipe would
block it), ready when its readiness URL answers 200; stopped with SIGTERM, then SIGKILL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from normserve.bench.wrk import WrkResult

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # holds bench/ and service/
READY_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 30.0


class ServerError(RuntimeError):
    """A server under test did not start, or answered a check wrongly."""


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path
    command: list[str]
    grpc_address: str | None = None  # normserve's gRPC endpoint (host:port)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def processes(self) -> list[psutil.Process]:
        """The server's process and every process under it (uvicorn's supervisor and workers)."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server and every process under it, so far."""
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[int, float]:
        """User + system CPU seconds so far of each process of the server (supervisor and workers)."""
        out: dict[int, float] = {}
        for p in self.processes():
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            out[p.pid] = t.user + t.system
        return out

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process under it (uvicorn's workers)."""
        total = 0
        for p in self.processes():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total


class CpuMeter:
    """CPU used while one load run goes on: the server's, each of its processes', the machine's."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.processes = server.cpu_by_process()
        self.machine = machine_cpu_seconds()

    def fill(self, result: WrkResult) -> WrkResult:
        """`result` with the CPU used since this meter started."""
        now = self.server.cpu_by_process()
        used = [t - self.processes.get(pid, 0.0) for pid, t in now.items()]
        result.server_cpu_s = sum(used)
        result.process_cpu_s = sorted(used, reverse=True)
        result.machine_cpu_s = machine_cpu_seconds() - self.machine
        return result


def machine_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (busy time of all CPUs,
    time the hypervisor stole included: it is CPU the server did not get either)."""
    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def normserve_command(port: int, repository: Path, workers: int | None, python: str | None = None) -> list[str]:
    command = [python or sys.executable, "-m", "normserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--model-repository", str(repository)]
    return command + ([] if workers is None else ["--workers", str(workers)])


def ready_info(server: ServerProcess) -> dict[str, Any]:
    """normserve's readiness answer (its workers, models and their state)."""
    with urllib.request.urlopen(server.base_url + READY_PATHS["normserve"], timeout=5.0) as response:
        info: dict[str, Any] = json.load(response)
        return info


def naive_command(port: int) -> list[str]:
    # Same uvicorn, same event loop and HTTP parser choice ("auto"), access log off like normserve's.
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "normserve.bench.naive_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


READY_PATHS = {"normserve": "/v2/health/ready", "naive": "/openapi.json"}


def server_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without NORMSERVE_* (the bench measures the defaults plus what it is told)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def start(
    name: str,
    log: Path,
    *,
    repository: Path,
    workers: int | None = None,
    env: dict[str, str] | None = None,
    cpus: str | None = None,
    checkout: Path | None = None,
    python: str | None = None,
) -> ServerProcess:
    """Start server `name` ("normserve" or "naive") and wait until it is ready; with `checkout`,
    the code of that checkout (a `git worktree` of another commit) instead of this one, run by
    `python` (that checkout's own environment, when its dependencies differ) if given."""
    port = free_port()
    repository = repository.resolve()  # the same models whatever the working directory
    if name == "normserve":
        command = normserve_command(port, repository, workers, python)
    elif name == "naive":
        command = naive_command(port)
    else:
        raise ValueError(f"unknown server {name!r}")
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    # normserve's gRPC on a free port of its own, not 8001 (another server may be there)
    grpc = {"NORMSERVE_GRPC_PORT": str(free_port())} if name == "normserve" else {}
    full_env = server_env({"NAIVE_MODEL_REPOSITORY": str(repository), **grpc, **(env or {})})
    if checkout is not None:  # `python -m` puts the working directory first on sys.path
        extra = (env or {}).get("PYTHONPATH")  # kept in front (scripts/request_ops.py puts a hook there)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, str(checkout.resolve())) if p)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=checkout)
    server = ServerProcess(name, process, f"http://127.0.0.1:{port}", log, command)
    if name == "normserve" and full_env.get("NORMSERVE_GRPC", "true").lower() not in ("0", "false", "no", "off"):
        server.grpc_address = f"127.0.0.1:{full_env['NORMSERVE_GRPC_PORT']}"
    ready_url = server.base_url + READY_PATHS[name]
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerError(f"{name} exited with {process.returncode} before it was ready:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2.0) as response:
                    if response.status == 200:
                        return server
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while models load
            time.sleep(0.1)
        raise ServerError(f"{name} was not ready within {READY_TIMEOUT_S:.0f}s:\n{server.log_tail()}")
    except BaseException:  # not ready, or interrupted while waiting: leave no process behind
        stop(server)
        raise


def stop(server: ServerProcess) -> None:
    """Whatever state the server is in, leave no process behind."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)


def post(
    base_url: str, path: str, body: bytes, headers: dict[str, str], timeout: float = 30.0
) -> tuple[int, str, bytes]:
    """One request with the standard library: (status, content type, body); HTTP errors included."""
    request = urllib.request.Request(base_url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("content-type", ""), exc.read()
