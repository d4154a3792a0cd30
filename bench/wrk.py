"""Drive a server with wrk (https://github.com/wg/wrk, Debian package `wrk`) and read its result.

wrk is a C event-loop generator: one thread pushes tens of thousands of small requests a second,
so on a small machine it leaves the CPU to the server, where a Python client would saturate
first and squeeze every ratio towards 1. POST bodies and the JSON summary come from `wrk.lua`.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import orjson

from normserve.bench.payloads import Workload

MARKER = "BENCH_JSON "
INSTALL_HINT = "install it with `bash scripts/install-wrk.sh` (Debian/Ubuntu: apt-get install wrk), or run `make bench`"


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed no summary."""


def find_wrk() -> str:
    """The wrk executable, or a WrkError that says how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise WrkError(f"normserve bench needs the wrk load generator, which is not on PATH: {INSTALL_HINT}")
    return path


def wrk_version(wrk: str) -> str:
    """wrk's version from `-v` ("wrk debian/4.1.0-3+b2 [epoll]"; it exits 1 after its usage)."""
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    first = ((done.stdout or done.stderr).strip().splitlines() or ["wrk (unknown version)"])[0]
    return first.split(" Copyright")[0].strip()


@dataclass
class WrkResult:
    """One wrk run. Latencies in milliseconds; `statuses` only when they were counted."""

    concurrency: int
    threads: int
    duration_s: float
    requests: int
    rps: float
    latency_ms: dict[str, float]  # p50, p75, p90, p95, p99, p99.9, mean, max
    errors: dict[str, int]  # wrk's connect / read / write / status (HTTP >= 400) / timeout
    statuses: dict[int, int] | None = None
    accepted_p99_ms: dict[str, float] | None = None  # bounds (low, high) when statuses were counted
    generator_cpu_s: float | None = None  # CPU seconds wrk itself used (user + system)
    server_cpu_s: float | None = None  # CPU seconds the server's processes used meanwhile
    machine_cpu_s: float | None = None  # CPU seconds every process on the machine used meanwhile
    # CPU seconds each of the server's processes used meanwhile, largest first: with several
    # workers the kernel spreads connections by a hash (SO_REUSEPORT), so a few keep-alive
    # connections can all land on one worker while another idles (docs/design/workers.md)
    process_cpu_s: list[float] | None = None

    @property
    def steady(self) -> bool:
        """At least three answers per connection: the queue went round, so the latencies are of
        a loaded server rather than of its first requests."""
        return self.requests >= 3 * self.concurrency

    @property
    def generator_cores(self) -> float | None:
        """Cores wrk kept busy: near 1 per wrk thread would mean the generator is the bottleneck."""
        return None if self.generator_cpu_s is None or not self.duration_s else self.generator_cpu_s / self.duration_s

    @property
    def busiest_share(self) -> float | None:
        """The busiest server process's share of the server's CPU during the run."""
        if not self.process_cpu_s or sum(self.process_cpu_s) <= 0:
            return None
        return max(self.process_cpu_s) / sum(self.process_cpu_s)

    @property
    def server_cores(self) -> float | None:
        return None if self.server_cpu_s is None or not self.duration_s else self.server_cpu_s / self.duration_s

    @property
    def other_cores(self) -> float | None:
        """Cores that neither the server nor wrk used: other work on the machine competing with
        the server. Large values mean the numbers measure the machine's load, not the server."""
        machine, server, generator = self.machine_cpu_s, self.server_cpu_s, self.generator_cpu_s
        if machine is None or server is None or generator is None or not self.duration_s:
            return None
        return max(0.0, machine - server - generator) / self.duration_s

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rejected_503(self) -> int | None:
        return None if self.statuses is None else self.statuses.get(503, 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["error_count"] = self.error_count
        d["steady"] = self.steady
        d["generator_cores"] = self.generator_cores
        d["server_cores"] = self.server_cores
        d["busiest_share"] = self.busiest_share
        d["other_cores"] = self.other_cores
        if self.statuses is not None:
            d["statuses"] = {str(k): v for k, v in sorted(self.statuses.items())}
            d["rejected_503"] = self.rejected_503
            d["other_errors"] = self.error_count - (self.rejected_503 or 0)
        return d


def parse_output(stdout: str, concurrency: int, threads: int) -> WrkResult:
    """The summary `wrk.lua` prints (one `BENCH_JSON {...}` line among wrk's own report)."""
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    if not lines:
        raise WrkError(f"wrk printed no {MARKER.strip()} summary line; its output was:\n{stdout.strip()}")
    try:
        raw = orjson.loads(lines[-1][len(MARKER) :])
    except orjson.JSONDecodeError as exc:
        raise WrkError(f"wrk's summary is not valid JSON ({exc}): {lines[-1]!r}") from None
    lat = raw["latency_us"]
    duration_s = raw["duration_us"] / 1e6
    latency_ms = {f"p{k}": v / 1000.0 for k, v in lat["percentiles"].items()}
    latency_ms.update(mean=lat["mean"] / 1000.0, max=lat["max"] / 1000.0)
    bounds = raw.get("accepted_p99_us")
    statuses = raw.get("statuses")
    return WrkResult(
        concurrency=concurrency,
        threads=threads,
        duration_s=duration_s,
        requests=int(raw["requests"]),
        rps=raw["requests"] / duration_s if duration_s > 0 else 0.0,
        latency_ms=latency_ms,
        errors={k: int(v) for k, v in raw["errors"].items()},
        statuses=None if statuses is None else {int(k): int(v) for k, v in statuses.items()},
        accepted_p99_ms=None if bounds is None else {k: v / 1000.0 for k, v in bounds.items()},
    )


class Wrk:
    """Runs wrk with the bench's Lua script against one base URL.

    `cpus` pins wrk (taskset CPU list, e.g. "1") so that it and the server do not trade cores.
    """

    def __init__(self, executable: str, *, threads: int = 1, cpus: str | None = None, timeout_s: float = 30.0) -> None:
        self.executable = executable
        self.threads = threads
        self.cpus = cpus
        self.timeout_s = timeout_s
        if cpus and shutil.which("taskset") is None:
            raise WrkError("--wrk-cpus needs taskset (util-linux), which is not on PATH")

    def command(self, url: str, concurrency: int, duration_s: float, script: Path) -> list[str]:
        threads = max(1, min(self.threads, concurrency))
        cmd = [self.executable, "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(duration_s))}s"]
        cmd += ["--timeout", f"{self.timeout_s:g}s", "-s", str(script), url]
        return ["taskset", "-c", self.cpus, *cmd] if self.cpus else cmd

    def start(
        self, base_url: str, workload: Workload, concurrency: int, duration_s: float, *, count_statuses: bool = False
    ) -> RunningWrk:
        return RunningWrk(self, base_url, workload, concurrency, duration_s, count_statuses)

    def run(
        self, base_url: str, workload: Workload, concurrency: int, duration_s: float, *, count_statuses: bool = False
    ) -> WrkResult:
        return self.start(base_url, workload, concurrency, duration_s, count_statuses=count_statuses).wait()


class RunningWrk:
    """A wrk process in flight (the soak samples the server while it runs)."""

    def __init__(
        self, wrk: Wrk, base_url: str, workload: Workload, concurrency: int, duration_s: float, count_statuses: bool
    ) -> None:
        self.concurrency = concurrency
        self.threads = max(1, min(wrk.threads, concurrency))
        self._tmp = tempfile.TemporaryDirectory(prefix="normserve-bench-")
        body = Path(self._tmp.name) / "body"
        body.write_bytes(workload.body)
        self._script_ctx = as_file(files("normserve.bench") / "wrk.lua")
        script = self._script_ctx.__enter__()
        env = dict(os.environ)
        env.update(
            BENCH_BODY_FILE=str(body),
            BENCH_METHOD="POST",
            BENCH_HEADERS="\n".join(f"{k}: {v}" for k, v in workload.headers.items()),
            BENCH_COUNT_STATUSES="1" if count_statuses else "0",
        )
        self.command = wrk.command(base_url.rstrip("/") + workload.path, concurrency, duration_s, script)
        # The bench runs one wrk at a time and reaps nothing else meanwhile, so the growth of
        # RUSAGE_CHILDREN across this run is wrk's own CPU time.
        self._rusage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.process = subprocess.Popen(
            self.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def finished_within(self, seconds: float) -> bool:
        """Wait up to `seconds` for wrk to end (its output is a few lines: the pipe cannot fill)."""
        try:
            self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def wait(self) -> WrkResult:
        try:
            out, _ = self.process.communicate()
        except BaseException:  # interrupted: no wrk outlives the bench
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self._script_ctx.__exit__(None, None, None)
            self._tmp.cleanup()
        if self.process.returncode != 0:
            raise WrkError(f"{' '.join(self.command)} exited with {self.process.returncode}:\n{out.strip()}")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = parse_output(out, self.concurrency, self.threads)
        result.generator_cpu_s = (after.ru_utime - self._rusage.ru_utime) + (after.ru_stime - self._rusage.ru_stime)
        return result
