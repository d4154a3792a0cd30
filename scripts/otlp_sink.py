"""A do-nothing OTLP/HTTP traces receiver for measuring tracing's cost: answers every
`POST /v1/traces` with 200 and an empty body without decoding it (so the receiver costs the
machine little next to the server it measures), and prints what it got when stopped.

    python scripts/otlp_sink.py 43181 &      # then OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://127.0.0.1:43181/v1/traces
"""

from __future__ import annotations

import contextlib
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

received = {"requests": 0, "bytes": 0}


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector

    def do_POST(self) -> None:
        size = int(self.headers.get("content-length") or 0)
        self.rfile.read(size)
        received["requests"] += 1
        received["bytes"] += size
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> int:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 4318
    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    print(f"otlp sink: {received['requests']} export requests, {received['bytes']} bytes", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
