"""`normserve bench --grpc`: V2 infer of one 1×3×32×32 image over gRPC against the same over HTTP
with the binary tensor extension, at one concurrency (32 by default), on one server, in one run.

HTTP is driven by wrk (the `v2` workload); gRPC by `grpc_load` in one or more processes of its
own, the same total concurrency split between them, one connection per concurrent call on both
sides. The request is the same: input `image` FP32 raw, output `logits` raw. The measurements
interleave (HTTP, gRPC with each number of client processes, in a rotating order, `--grpc-rounds`
times) so a change in the machine's load lands on every side; medians are reported.

Whether the Python client limits what gRPC shows: the same load from more client processes. If
two processes do not answer more calls than one, one process was not the bottleneck. The CPU the
generators use is reported too (on a small machine they take it from the server).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normserve.bench.payloads import Workload, build_workloads
from normserve.bench.servers import PACKAGE_ROOT, ServerError, ServerProcess, machine_cpu_seconds, server_env
from normserve.bench.wrk import Wrk
from normserve.contract import LOGITS_OUTPUT
from normserve.service.grpc_server import message_class

START_DELAY_S = 2.0  # generator processes import grpc and connect before the common start time


@dataclass
class Measurement:
    side: str  # "http" or "grpc xN" (N client processes)
    round: int
    rps: float
    requests: int
    errors: int
    latency_ms: dict[str, float]
    generator_cores: float | None
    server_cores: float | None
    other_cores: float | None

    @property
    def per_server_core(self) -> float | None:
        """Calls answered per second of server CPU: what a call costs the server, which other
        work on a shared machine disturbs far less than the throughput."""
        return self.rps / self.server_cores if self.server_cores else None

    def row(self) -> str:
        lat = self.latency_ms
        cores = " ".join(
            f"{name} {v:.2f}" if v is not None else f"{name} -"
            for name, v in (("gen", self.generator_cores), ("srv", self.server_cores), ("other", self.other_cores))
        )
        return (
            f"  round {self.round} {self.side:<9} {self.rps:8.1f}/s  {self.per_server_core or 0:6.0f}/server-core-s  "
            f"p50 {lat.get('p50', 0):6.2f} ms  "
            f"p99 {lat.get('p99', 0):6.2f} ms  errors {self.errors}  cores: {cores}"
        )


@dataclass
class GrpcComparison:
    concurrency: int
    duration_s: float
    client_processes: list[int]
    measurements: list[Measurement] = field(default_factory=list)

    def median_rps(self, side: str) -> float:
        return statistics.median(m.rps for m in self.measurements if m.side == side)

    def median_per_core(self, side: str) -> float:
        return statistics.median(m.per_server_core or 0.0 for m in self.measurements if m.side == side)

    def summary(self) -> dict[str, Any]:
        sides = ["http", *(f"grpc x{n}" for n in self.client_processes)]
        medians = {s: self.median_rps(s) for s in sides}
        per_core = {s: self.median_per_core(s) for s in sides}
        best_grpc = max(medians[f"grpc x{n}"] for n in self.client_processes)
        best_per_core = max(per_core[f"grpc x{n}"] for n in self.client_processes)
        out: dict[str, Any] = {
            "median_rps": medians,
            "grpc_over_http": best_grpc / medians["http"],
            "median_per_server_core": per_core,
            "grpc_over_http_per_server_core": best_per_core / per_core["http"],
        }
        if len(self.client_processes) > 1:
            one, most = self.client_processes[0], self.client_processes[-1]
            out["more_clients_gain"] = medians[f"grpc x{most}"] / medians[f"grpc x{one}"] - 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "duration_s": self.duration_s,
            "client_processes": self.client_processes,
            "measurements": [asdict(m) | {"per_server_core": m.per_server_core} for m in self.measurements],
            "summary": self.summary(),
        }


def infer_request(w: Workload) -> bytes:
    """The gRPC twin of the HTTP `v2` workload: the same tensor raw, `logits` asked for."""
    request = message_class("ModelInferRequest")(model_name="gncnn")
    request.inputs.add(name="image", datatype="FP32", shape=list(w.tensor.shape))  # type: ignore[attr-defined]
    request.outputs.add(name=LOGITS_OUTPUT)  # type: ignore[attr-defined]
    request.raw_input_contents.append(np.ascontiguousarray(w.tensor, dtype="<f4").tobytes())  # type: ignore[attr-defined]
    return request.SerializeToString()


def check_grpc(address: str, payload: bytes) -> None:
    """One call before any load: logits of the right shape, or no benchmark."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            raw = call(payload, timeout=30)
        except grpc.RpcError as exc:
            raise ServerError(f"gRPC check call failed: {exc}") from None
    response = message_class("ModelInferResponse").FromString(raw)
    shapes = [list(o.shape) for o in response.outputs]  # type: ignore[attr-defined]
    if shapes != [[1, 10]]:
        raise ServerError(f"gRPC check call answered outputs of shapes {shapes}")


def _percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    a = np.asarray(latencies)
    return {f"p{p:g}": float(np.percentile(a, p)) for p in (50, 90, 99)} | {"mean": float(a.mean())}


def _grpc_run(
    server: ServerProcess, address: str, payload_file: Path, concurrency: int, processes: int, args: argparse.Namespace
) -> tuple[dict[str, Any], float, float]:
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    start_at = time.time() + START_DELAY_S
    env = server_env({})
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "normserve.bench.grpc_load",
                f"--address={address}",
                f"--payload={payload_file}",
                f"--concurrency={share}",
                f"--start-at={start_at}",
                f"--warmup={args.warmup}",
                f"--duration={args.duration}",
            ],
            stdout=subprocess.PIPE,
            env=env,
            cwd=PACKAGE_ROOT,
        )
        for share in shares
    ]
    time.sleep(max(0.0, start_at + args.warmup - time.time()))
    cpu, machine = server.cpu_seconds(), machine_cpu_seconds()
    outputs = [p.communicate(timeout=START_DELAY_S + args.warmup + args.duration + 120)[0] for p in procs]
    server_cpu, machine_cpu = server.cpu_seconds() - cpu, machine_cpu_seconds() - machine
    results = []
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise ServerError(f"the gRPC load generator failed ({p.returncode})")
        results.append(json.loads(out))
    merged = {
        "rps": sum(r["requests"] / r["duration_s"] for r in results),
        "requests": sum(r["requests"] for r in results),
        "errors": sum(sum(r["errors"].values()) for r in results),
        "latency_ms": _percentiles([v for r in results for v in r["latencies_ms"]]),
        "generator_cpu_s": sum(r["cpu_s"] for r in results),
        "duration_s": max(r["duration_s"] for r in results),
    }
    return merged, server_cpu, machine_cpu


def compare(
    wrk: Wrk,
    server: ServerProcess,
    grpc_address: str,
    args: argparse.Namespace,
    measure_http: Any,
    drain_http: Any,
) -> GrpcComparison:
    """Interleaved rounds of HTTP (wrk) and gRPC (1..N client processes) at one concurrency."""
    (w,) = build_workloads(["v2"])
    payload = infer_request(w)
    check_grpc(grpc_address, payload)
    result = GrpcComparison(args.grpc_concurrency, args.duration, args.grpc_clients)
    sides = ["http", *args.grpc_clients]
    with tempfile.TemporaryDirectory(prefix="normserve-grpc-bench-") as tmp:
        payload_file = Path(tmp) / "request.bin"
        payload_file.write_bytes(payload)
        for r in range(args.grpc_rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            for side in order:
                if side == "http":
                    wr = measure_http(wrk, server, w, args.grpc_concurrency, args)
                    m = Measurement(
                        "http",
                        r + 1,
                        wr.rps,
                        wr.requests,
                        wr.error_count,
                        {k: wr.latency_ms[k] for k in ("p50", "p90", "p99", "mean") if k in wr.latency_ms},
                        wr.generator_cores,
                        wr.server_cores,
                        wr.other_cores,
                    )
                else:
                    g, server_cpu, machine_cpu = _grpc_run(
                        server, grpc_address, payload_file, args.grpc_concurrency, int(side), args
                    )
                    d = g["duration_s"]
                    m = Measurement(
                        f"grpc x{side}",
                        r + 1,
                        g["rps"],
                        g["requests"],
                        g["errors"],
                        g["latency_ms"],
                        g["generator_cpu_s"] / d,
                        server_cpu / d,
                        max(0.0, machine_cpu - server_cpu - g["generator_cpu_s"]) / d,
                    )
                    check_grpc(grpc_address, payload)  # what the run left queued is worked off
                drain_http(server, w)
                result.measurements.append(m)
                print(m.row(), flush=True)
    return result


def print_comparison(result: GrpcComparison) -> None:
    s = result.summary()
    rounds = max(m.round for m in result.measurements)
    print(f"\nV2 infer 1×3×32×32 at c={result.concurrency}, {result.duration_s:g} s runs, medians of {rounds} rounds:")
    for side, rps in s["median_rps"].items():
        print(f"  {side:<9} {rps:8.1f} req/s  {s['median_per_server_core'][side]:6.0f} per server CPU-second")
    print(
        f"  gRPC / HTTP binary: {s['grpc_over_http']:.2f}x in throughput, "
        f"{s['grpc_over_http_per_server_core']:.2f}x per server CPU-second"
    )
    if "more_clients_gain" in s:
        gain = s["more_clients_gain"]
        verdict = (
            "the client is not the bottleneck"
            if gain < 0.05
            else "more client processes answered more: the client may limit gRPC, unless other load moved "
            "(compare the runs' `other` cores)"
        )
        print(
            f"  gRPC with {result.client_processes[-1]} client processes vs {result.client_processes[0]}: "
            f"{gain:+.1%} ({verdict})"
        )
