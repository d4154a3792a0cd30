"""CPU cost per request of the HTTP limits (service/http_limits.py) against uvicorn's own httptools
protocol: both parse the same keep-alive requests, each arriving in one read, into a trivial ASGI
app on one event loop, interleaved in rounds; prints µs per request and the ratio.

    flock /tmp/normserve-bench.lock python -m scripts.http_overhead --requests 20000 --rounds 5

What wrk measures end to end includes this and much more (the app, the model, the socket); this
isolates what the subclass adds to the parser's path.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from normserve.service.http_limits import HttpLimits, LimitedHttpToolsProtocol

REQUEST = (
    b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: image/png\r\n"
    b"Content-Length: 64\r\n\r\n" + b"\0" * 64
)


async def app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def run(cls: type[HttpToolsProtocol], requests: int) -> float:
    config = Config(app, log_level="warning", limit_concurrency=128)
    config.load()
    # No cap on requests per connection: past it the real connection closes and the client reconnects.
    config.http_limits = HttpLimits(keep_alive_max_requests=0)  # type: ignore[attr-defined]
    protocol = cls(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(Transport())
    started = time.perf_counter()
    for _ in range(requests):
        protocol.data_received(REQUEST)
        await asyncio.sleep(0)  # the request's task runs and answers
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - started
    protocol.connection_lost(None)
    return elapsed / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {"uvicorn httptools": [], "with limits": []}
    classes = {"uvicorn httptools": HttpToolsProtocol, "with limits": LimitedHttpToolsProtocol}
    for k in range(args.rounds):  # interleaved, the order alternating
        for name in sorted(classes, reverse=bool(k % 2)):
            times[name].append(asyncio.run(run(classes[name], args.requests)))
    base = statistics.median(times["uvicorn httptools"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<18} {median:7.2f} µs/request (median of {args.rounds})  ratio {median / base:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
