"""`normserve bench`'s arguments and presets, apart from the run so that `--help` works without the
bench extra (psutil) installed."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normserve.bench.payloads import WORKLOAD_NAMES

SERVERS = ("normserve", "naive")  # what a run compares


@dataclass(frozen=True)
class Preset:
    duration: float  # seconds measured per point
    warmup: float  # seconds of unmeasured load before each point
    concurrency: str
    raw_seconds: float  # per raw ORT / torch timing


DEFAULTS = Preset(duration=10.0, warmup=2.0, concurrency="1,4,8,32,64", raw_seconds=2.0)
DRAIN_TIMEOUT_S = 600.0
QUICK = Preset(duration=2.0, warmup=1.0, concurrency="1,4,32", raw_seconds=0.5)


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"concurrencies must be positive integers, got {text!r}")
    return values


def _name_list(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = sorted(set(names) - set(choices))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {list(choices)}; got {text!r}")
        return names

    return parse


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="normserve bench",
        description="Throughput and latency of normserve against raw ONNX Runtime and a naive FastAPI app (wrk).",
    )
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="model repository to serve")
    p.add_argument(
        "--workloads",
        type=_name_list(WORKLOAD_NAMES),
        default=list(WORKLOAD_NAMES),
        help=f"comma list from {','.join(WORKLOAD_NAMES)} (default: all)",
    )
    p.add_argument("--servers", type=_name_list(SERVERS), default=list(SERVERS), help="normserve,naive")
    p.add_argument("--concurrency", type=_int_list, help=f"comma list (default {DEFAULTS.concurrency})")
    p.add_argument("--duration", type=float, help=f"seconds measured per point (default {DEFAULTS.duration:g})")
    p.add_argument("--warmup", type=float, help=f"seconds of unmeasured load first (default {DEFAULTS.warmup:g})")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s points at c=1,4,32, short raw timings")
    p.add_argument(
        "--workers", type=int, help="normserve worker processes (default: serve's own; the naive app has one)"
    )
    p.add_argument(
        "--server-env",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for normserve, e.g. NORMSERVE_INTRA_OP_THREADS=2 (repeatable); inherited NORMSERVE_* are dropped",
    )
    p.add_argument(
        "--checkout",
        type=Path,
        help="serve normserve from the code of this checkout (e.g. `git archive OLD | tar -x -C DIR`), driven by "
        "this bench: compares commits with one load generator and one measurement",
    )
    p.add_argument("--server-python", help="the interpreter for --checkout's server (default: this one)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--wrk-cpus", help="pin wrk to these CPUs (taskset list, e.g. 1); default: not pinned")
    p.add_argument("--server-cpus", help="pin the servers to these CPUs (taskset list); default: not pinned")
    p.add_argument("--timeout", type=float, default=30.0, help="wrk's per-request timeout in seconds (default 30)")
    p.add_argument(
        "--no-status-counts",
        dest="count_statuses",
        action="store_false",
        help="do not count responses by status in the sweep (wrk's leanest path; --overload and --soak still count)",
    )
    p.add_argument("--raw-seconds", type=float, help="seconds per raw ORT / torch timing (default 2)")
    p.add_argument("--no-raw", action="store_true", help="skip the raw in-process ORT measurement")
    p.add_argument("--no-torch", action="store_true", help="skip ORT vs PyTorch eager")
    p.add_argument("--no-plot", action="store_true", help="write no PNG plot")
    p.add_argument("--overload", action="store_true", help="also drive /classify far past capacity (503s counted)")
    p.add_argument(
        "--overload-concurrency", type=int, help="overload concurrency (default: max(2 × largest, 4 × saturating))"
    )
    p.add_argument("--soak", type=float, metavar="MINUTES", help="soak mode: only a long run on normserve")
    p.add_argument("--soak-concurrency", type=int, default=32, help="soak concurrency (default 32)")
    p.add_argument("--soak-workload", choices=WORKLOAD_NAMES, default="classify", help="soak workload")
    p.add_argument("--soak-interval", type=float, default=30.0, help="seconds per soak interval (default 30)")
    p.add_argument(
        "--grpc",
        action="store_true",
        help="gRPC mode: only V2 infer 1x3x32x32 over gRPC vs HTTP binary on normserve, interleaved rounds",
    )
    p.add_argument("--grpc-concurrency", type=int, default=32, help="gRPC mode: concurrency (default 32)")
    p.add_argument(
        "--grpc-clients",
        type=_int_list,
        default=[1, 2],
        help="gRPC mode: client process counts to compare (default 1,2: shows whether the client limits gRPC)",
    )
    p.add_argument("--grpc-rounds", type=int, default=3, help="gRPC mode: interleaved rounds (default 3)")
    p.add_argument("--out", type=Path, help="output folder (default runs/bench/<timestamp>)")
    return p
