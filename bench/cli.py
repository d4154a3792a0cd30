"""`normserve bench` (also `python -m normserve.bench`): measure normserve against raw ONNX Runtime and a
naive FastAPI baseline in one run on one machine, with wrk as the load generator.

Steps: ORT vs PyTorch eager (when torch is there); both servers started as subprocesses; then
per workload, raw in-process ORT throughput followed by each concurrency on each server in turn
(a warm-up run, a drain, the measured run, a drain); optionally an overload run; then tables,
the target ratios, JSON and a plot. `--soak MINUTES` runs the soak instead.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import orjson

from normserve.bench import grpc_bench, report
from normserve.bench.args import DEFAULTS, DRAIN_TIMEOUT_S, QUICK, _int_list, build_parser
from normserve.bench.payloads import Workload, build_workloads
from normserve.bench.raw import RawOrt, ort_vs_torch
from normserve.bench.servers import CpuMeter, ServerError, ServerProcess, post, ready_info, start, stop
from normserve.bench.soak import soak
from normserve.bench.wrk import Wrk, WrkError, WrkResult, find_wrk, wrk_version
from normserve.service.settings import usable_cpus


def _resolve(args: argparse.Namespace) -> None:
    preset = QUICK if args.quick else DEFAULTS
    if args.concurrency is None:
        args.concurrency = _int_list(preset.concurrency)
    for key in ("duration", "warmup", "raw_seconds"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(preset, key))
    if args.out is None:
        args.out = Path("runs") / "bench" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.repository = args.repository.resolve()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("onnxruntime", "uvicorn", "fastapi", "starlette", "numpy", "pillow", "uvloop", "httptools", "torch"):
        try:
            out[dist] = pkg_version(dist)
        except PackageNotFoundError:
            continue
    return out


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _check(server: ServerProcess, w: Workload) -> None:
    """One request before any load: a server that answers this workload wrongly is not benchmarked."""
    status, ctype, body = post(server.base_url, w.path, w.body, w.headers)
    if status != 200 or not ctype.startswith(w.expect_type):
        raise ServerError(f"{server.name} answered {w.name} with {status} {ctype}: {body[:300]!r}\n{server.log_tail()}")


def _drain(server: ServerProcess, w: Workload) -> None:
    """Wait until the server has worked off what a finished wrk run left in flight.

    wrk stops with up to `concurrency` requests outstanding and the servers still compute them
    (a disconnect cancels nothing), so without this a run would start behind the previous
    one's leftovers. One request of the same kind, answered, means the queue in front of it
    (FIFO) is empty; a 503 (queue full, after an overload run) is retried.
    """
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        status, _, body = post(server.base_url, w.path, w.body, w.headers, timeout=DRAIN_TIMEOUT_S)
        if status == 200:
            return
        if status != 503 or time.monotonic() > deadline:
            raise ServerError(f"{server.name} answered a drain request with {status}: {body[:300]!r}")
        time.sleep(0.2)


def _measure(wrk: Wrk, server: ServerProcess, w: Workload, c: int, args: argparse.Namespace) -> WrkResult:
    if args.warmup >= 1:
        wrk.run(server.base_url, w, c, args.warmup)
        _drain(server, w)
    meter = CpuMeter(server)
    result = meter.fill(wrk.run(server.base_url, w, c, args.duration, count_statuses=args.count_statuses))
    _drain(server, w)
    return result


def _overload(wrk: Wrk, server: ServerProcess, run: report.BenchRun, args: argparse.Namespace) -> None:
    sweep = run.points.get(server.name, {}).get("classify", {})
    if not sweep:
        print(f"  overload: skipped for {server.name} (it drives /classify; add classify to --workloads)")
        return
    capacity = max(r.rps for r in sweep.values())
    saturating = min(c for c, r in sweep.items() if r.rps >= 0.9 * capacity)
    concurrency = args.overload_concurrency or max(2 * max(sweep), 4 * saturating)
    w = next(w for w in run.workloads if w.name == "classify")
    print(f"  overload: {server.name} /classify at c={concurrency} (capacity {capacity:.1f} req/s)", flush=True)
    meter = CpuMeter(server)
    result = meter.fill(wrk.run(server.base_url, w, concurrency, args.duration, count_statuses=True))
    _drain(server, w)
    run.overload.append(report.Overload(server.name, capacity, saturating, result))


def _write(run: report.BenchRun, args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    run.meta["loadavg_end"] = _loadavg()
    run.meta["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    path = args.out / "bench.json"
    path.write_bytes(orjson.dumps(run.to_dict(), option=orjson.OPT_INDENT_2))
    print(f"\nwrote {path}")
    if not args.no_plot and run.points:
        drawn = report.plot(run, args.out / "bench.png")
        print(f"wrote {drawn}" if isinstance(drawn, Path) else drawn)


def run_bench(args: argparse.Namespace) -> int:
    _resolve(args)
    executable = find_wrk()  # fail first, with the install hint, if wrk is missing
    wrk = Wrk(executable, threads=args.wrk_threads, cpus=args.wrk_cpus, timeout_s=args.timeout)
    if not (args.repository / "gncnn").is_dir() or not (args.repository / "in_autoencoder").is_dir():
        raise ServerError(f"{args.repository} does not hold gncnn/ and in_autoencoder/ (--repository)")
    server_env = dict(args.server_env)
    bad = sorted(k for k in server_env if not k.startswith("NORMSERVE_"))
    if bad:
        print(f"note: --server-env {bad} are not NORMSERVE_* settings; passed through as they are")
    soak_only = args.soak is not None
    workloads = build_workloads([args.soak_workload] if soak_only else args.workloads)
    generator = f"{wrk_version(executable)}, {args.wrk_threads} thread(s)" + (
        f", pinned to CPUs {args.wrk_cpus}" if args.wrk_cpus else ", not pinned"
    )
    meta: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(["normserve", "bench", *args.argv]),
        "generator": generator,
        "host": {
            "cpus": os.cpu_count(),
            "cpus_usable": usable_cpus(),  # the affinity mask, capped by a cgroup CPU quota
            "machine": platform.machine(),
            "loadavg_start": _loadavg(),
        },
        "versions": _versions(),
        "git_commit": _git_commit(),
        "repository": str(args.repository),
        "normserve": {"workers": args.workers, "server_env": server_env, "cpus": args.server_cpus},
        "durations": {"measured_s": args.duration, "warmup_s": args.warmup, "raw_s": args.raw_seconds},
        "concurrency": args.concurrency,
        "wrk_timeout_s": args.timeout,
    }
    run = report.BenchRun(meta, workloads)
    print(f"normserve bench: load generator {generator}; output in {args.out}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.grpc:
        return _grpc_mode(wrk, run, server_env, args)

    if soak_only:
        server = _start_normserve(server_env, args)
        try:
            _check(server, workloads[0])
            print(f"soak: {workloads[0].description} at c={args.soak_concurrency} for {args.soak:g} min", flush=True)
            run.soak = soak(
                server,
                workloads[0],
                wrk,
                concurrency=args.soak_concurrency,
                duration_s=args.soak * 60.0,
                interval_s=args.soak_interval,
            )
        finally:
            stop(server)
        report.print_soak(run.soak)
        _write(run, args)
        return 0

    if not args.no_torch:
        print("ORT vs torch eager ...", flush=True)
        run.torch = ort_vs_torch(args.repository, server_env, args.raw_seconds)
        report.print_torch(run)
    try:
        _sweep(wrk, run, server_env, args)
    except BaseException as exc:  # interrupted, or a server misbehaved: keep what was measured
        run.meta["interrupted"] = f"{type(exc).__name__}: {exc}"
        print(f"\nstopped early ({type(exc).__name__}): reporting what was measured so far", flush=True)
        _report(run, args)
        raise
    _report(run, args)
    return 0


def _start_normserve(server_env: dict[str, str], args: argparse.Namespace) -> ServerProcess:
    """normserve alone, as the soak and the gRPC comparison run it."""
    return start(
        "normserve",
        args.out / "normserve.log",
        repository=args.repository,
        workers=args.workers,
        env=server_env,
        cpus=args.server_cpus,
        checkout=args.checkout,
        python=args.server_python,
    )


def _grpc_mode(wrk: Wrk, run: report.BenchRun, server_env: dict[str, str], args: argparse.Namespace) -> int:
    """gRPC vs HTTP binary V2 infer on one normserve server (grpc_bench.py)."""
    server = _start_normserve(server_env, args)
    try:
        if server.grpc_address is None:
            raise ServerError("--grpc needs normserve's gRPC endpoint (drop NORMSERVE_GRPC=false)")
        run.meta["normserve"]["workers"] = ready_info(server).get("workers")
        (w,) = build_workloads(["v2"])
        _check(server, w)
        print(f"normserve: {' '.join(server.command)}; gRPC on {server.grpc_address}", flush=True)
        run.grpc = grpc_bench.compare(wrk, server, server.grpc_address, args, _measure, _drain)
    finally:
        stop(server)
    grpc_bench.print_comparison(run.grpc)
    if run.meta["host"]["loadavg_start"]:
        print(f"\nload average at start {run.meta['host']['loadavg_start']}, at end {_loadavg()}")
    _write(run, args)
    return 0


def _sweep(wrk: Wrk, run: report.BenchRun, server_env: dict[str, str], args: argparse.Namespace) -> None:
    """Start the servers side by side (idle ones use no CPU), then for each workload: raw ORT,
    then every concurrency on each server in turn. Interleaving keeps a change in the machine's
    load from landing on one side of a comparison only."""
    with contextlib.ExitStack() as stack:
        raw = None if args.no_raw else stack.enter_context(RawOrt(args.repository, server_env, args.raw_seconds))
        if raw is not None:
            run.raw, run.raw_info = raw.results, raw.info()
        servers: dict[str, ServerProcess] = {}
        for name in args.servers:
            servers[name] = start(
                name,
                args.out / f"{name}.log",
                repository=args.repository,
                workers=args.workers if name == "normserve" else 1,
                env=server_env if name == "normserve" else {},
                cpus=args.server_cpus,
                checkout=args.checkout if name == "normserve" else None,
                python=args.server_python if name == "normserve" else None,
            )
            stack.callback(stop, servers[name])
            print(f"{name}: {' '.join(servers[name].command)}", flush=True)
        if "normserve" in servers:  # how many workers it runs (its default when not told)
            run.meta["normserve"]["workers"] = ready_info(servers["normserve"]).get("workers")
        for w in run.workloads:
            names = [n for n in args.servers if n in w.servers]
            for name in names:
                _check(servers[name], w)
            line = f"{w.name}:"
            if raw is not None:
                r = raw.measure(w.model, w.output, w.tensor)
                line += f" raw ORT {r.batch1:.1f}/s (batch 1), {r.best:.1f}/s (batch {r.best_batch});"
            print(line, end="", flush=True)
            for c in args.concurrency:
                for name in names:
                    result = _measure(wrk, servers[name], w, c, args)
                    run.points.setdefault(name, {}).setdefault(w.name, {})[c] = result
                    print(f" {name} c={c} {result.rps:.1f}/s", end="", flush=True)
            print(flush=True)
        if args.overload:
            for name in args.servers:
                _overload(wrk, servers[name], run, args)


def _report(run: report.BenchRun, args: argparse.Namespace) -> None:
    report.print_raw(run)
    report.print_points(run)
    report.print_comparisons(run)
    report.print_overload(run)
    report.print_targets(run)
    if run.meta["host"]["loadavg_start"]:
        print(
            f"\nload average at start {run.meta['host']['loadavg_start']}, at end {_loadavg()} "
            "(other work on the machine slows every number; compare runs only at similar load)"
        )
    _write(run, args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in the JSON: how to reproduce the run
    if args.soak is not None and (args.soak * 60 < 1 or args.soak_interval < 1):
        parser.error("--soak and --soak-interval need at least one second")
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so no server is left running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run_bench(args)
    except (WrkError, ServerError) as exc:
        print(f"normserve bench: {exc}", file=sys.stderr)
        return 2
