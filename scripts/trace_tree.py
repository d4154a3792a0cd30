"""Print the trace of one real request as a tree: starts an OTLP/HTTP receiver and `normserve serve`
with tracing on (the test suite's helpers, tests/service/), sends one request with a `traceparent`
as an upstream service would, and prints the spans the server exported (docs/tracing.md shows the
output).

    .venv/bin/python scripts/trace_tree.py            # /classify
    .venv/bin/python scripts/trace_tree.py v2         # V2 infer (JSON tensors)
"""

from __future__ import annotations

import json
import secrets
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))
from images import image_bytes
from otlp_receiver import Span, otlp_receiver
from servers import running_server

SHOWN = ("normserve.", "http.route", "http.response.status_code", "http.status_code")


def _request(kind: str) -> tuple[str, bytes, str]:
    if kind == "v2":
        x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
        body = {"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": x.ravel().tolist()}]}
        return "/v2/models/gncnn/infer", json.dumps(body).encode(), "application/json"
    return "/classify", image_bytes(64, 48), "image/png"


def _print(spans: list[Span], parent: str | None, t0: int, depth: int) -> None:
    for s in sorted((s for s in spans if s.parent_id == parent), key=lambda s: s.start_ns):
        attrs = {k: v for k, v in s.attributes.items() if k.startswith(SHOWN)}
        links = f"  [{len(s.links)} link{'s' * (len(s.links) > 1)}]" if s.links else ""
        offset, duration = (s.start_ns - t0) / 1e6, (s.end_ns - s.start_ns) / 1e6
        shown = " ".join(f"{k}={v}" for k, v in attrs.items())
        print(f"{'  ' * depth}{s.name:<{30 - 2 * depth}} +{offset:6.2f} ms {duration:6.2f} ms  {shown}{links}")
        _print(spans, s.span_id, t0, depth + 1)


def main() -> int:
    path, body, content_type = _request(sys.argv[1] if len(sys.argv) > 1 else "classify")
    trace_id, upstream = secrets.token_hex(16), secrets.token_hex(8)
    with otlp_receiver() as receiver, tempfile.TemporaryDirectory() as tmp:
        env = {
            "NORMSERVE_TRACING": "true",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        with running_server(Path(tmp) / "server.log", "--workers", "1", env=env) as server:
            for _ in range(3):  # warm: the first requests of a process import and allocate what later ones reuse
                httpx.post(server.base_url + path, content=body, headers={"content-type": content_type})
            headers = {"content-type": content_type, "traceparent": f"00-{trace_id}-{upstream}-01"}
            httpx.post(server.base_url + path, content=body, headers=headers).raise_for_status()
            spans = receiver.wait(lambda got: sum(s.trace_id == trace_id for s in got) >= 6)
            access = next(ln for ln in server.log_text().splitlines() if trace_id in ln)
    mine = [s for s in spans if s.trace_id == trace_id]
    root = next(s for s in mine if s.parent_id == upstream)
    resource = {k: v for k, v in root.resource.items() if k.startswith(("service.name", "service.version", "process"))}
    print(f"trace {trace_id}, resource {resource}; the caller's span {upstream}:")
    _print(mine, upstream, root.start_ns, 0)
    print("access log:", access)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
