"""A lean gRPC load generator for `normserve bench --grpc` (run as a process of its own:
`python -m normserve.bench.grpc_load`).

`concurrency` loops, each on a channel of its own (its own TCP connection, as wrk opens one per
connection it keeps busy, so the server's workers share the load the same way), send one
pre-serialized request over and over with grpc.aio: no protobuf work per call on this side, bytes
in and bytes out. All processes of one measurement start their measured window at the same
wall-clock time (`--start-at`), after a warm-up. It prints one JSON line: calls answered OK,
errors by status, the measured seconds, this process's CPU seconds and where the latencies went.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE = 64 * 1024 * 1024


async def _run(
    address: str, payload: bytes, concurrency: int, start_at: float, warmup_s: float, duration_s: float
) -> dict[str, object]:
    options = [
        ("grpc.use_local_subchannel_pool", 1),  # one connection per channel, not one shared
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(concurrency)]
    calls = [ch.unary_unary(METHOD) for ch in channels]  # no (de)serializers: bytes on the wire as they are
    await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 30)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    measuring = False

    async def loop(call: grpc.aio.UnaryUnaryMultiCallable, end: float) -> None:
        while True:
            started = time.perf_counter()
            if started >= end:
                return
            try:
                await call(payload, timeout=30)
            except grpc.aio.AioRpcError as exc:
                if measuring:
                    errors[exc.code().name] += 1
                continue
            if measuring:
                latencies.append(time.perf_counter() - started)

    await asyncio.sleep(max(0.0, start_at - time.time()))
    warm_end = time.perf_counter() + warmup_s
    await asyncio.gather(*(loop(c, warm_end) for c in calls))
    measuring = True
    cpu, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop(c, t0 + duration_s) for c in calls))
    elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - cpu
    await asyncio.gather(*(ch.close() for ch in channels))
    return {
        "requests": len(latencies),
        "errors": dict(errors),
        "duration_s": elapsed,
        "cpu_s": cpu_s,
        "latencies_ms": [round(v * 1000, 3) for v in latencies],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m normserve.bench.grpc_load", description=__doc__)
    p.add_argument("--address", required=True, help="host:port")
    p.add_argument("--payload", type=Path, required=True, help="a serialized ModelInferRequest")
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--start-at", type=float, required=True, help="wall-clock time (time.time()) to start")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, required=True)
    args = p.parse_args(argv)
    result = asyncio.run(
        _run(args.address, args.payload.read_bytes(), args.concurrency, args.start_at, args.warmup, args.duration)
    )
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
