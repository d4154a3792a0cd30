"""`/metrics`: Prometheus text with request, failure, latency, batch and readiness series."""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from servers import running_server
from shipped import DENOISER, GNCNN

from normserve.service.app import create_app
from normserve.service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = REPO_ROOT / "model_repository"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 9), (200, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_metrics_count_requests_failures_and_batches() -> None:
    with TestClient(create_app(Settings(model_repository=REPOSITORY))) as client:
        for _ in range(3):
            assert client.post("/classify", files={"file": ("a.png", _png())}).status_code == 200
        assert client.post("/reconstruct", content=_png(), headers={"content-type": "image/png"}).status_code == 200
        assert client.post("/classify", content=b"junk", headers={"content-type": "image/png"}).status_code == 400
        assert (
            client.post("/classify?model=nope", content=_png(), headers={"content-type": "image/png"}).status_code
            == 404
        )
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = _samples(r.text)
    assert _value(s, "normserve_requests_total", endpoint="/classify", model="gncnn", status="200") == 3
    assert _value(s, "normserve_requests_total", endpoint="/reconstruct", model="in_autoencoder", status="200") == 1
    assert _value(s, "normserve_failures_total", endpoint="/classify", reason="InvalidInput") == 1
    assert _value(s, "normserve_failures_total", endpoint="/classify", reason="ModelNotFound") == 1
    assert _value(s, "normserve_request_duration_seconds_count", endpoint="/classify") == 5
    # Only requests that reached a model ran it: 3 classify + 1 reconstruct, one row each.
    assert _value(s, "normserve_batch_size_count", model="gncnn") == 3
    assert _value(s, "normserve_batch_size_sum", model="gncnn") == 3
    assert _value(s, "normserve_compute_duration_seconds_count", model="in_autoencoder", version=DENOISER) == 1
    assert _value(s, "normserve_queue_duration_seconds_count", model="gncnn") == 3
    assert _value(s, "normserve_model_ready", model="gncnn", version=GNCNN, provider="CPUExecutionProvider") == 1
    assert _value(s, "normserve_requests_in_flight") == 1  # the scrape itself
    assert _value(s, "normserve_queue_depth", model="gncnn") == 0


def test_raw_paths_do_not_become_labels() -> None:
    with TestClient(create_app(Settings(model_repository=REPOSITORY))) as client:
        client.get("/v2/models/gncnn/ready")
        client.get("/no/such/path/123")
        text = client.get("/metrics").text
    assert 'endpoint="/v2/models/{name}/ready"' in text
    assert "/no/such/path" not in text and 'endpoint="other"' in text


@pytest.mark.e2e
def test_metrics_add_up_across_worker_processes(tmp_path: Path) -> None:
    """Two uvicorn workers: /metrics shows every request, whichever worker served it."""
    env = {"NORMSERVE_INTRA_OP_THREADS": "1"}
    with running_server(tmp_path / "server.log", "--workers", "2", env=env) as server:
        base = server.base_url
        n = 20
        for _ in range(n):  # new connection each time, so the kernel spreads them over workers
            assert httpx.post(f"{base}/classify", files={"file": ("a.png", _png())}).status_code == 200
        text = httpx.get(f"{base}/metrics").text
        s = _samples(text)
        assert _value(s, "normserve_requests_total", endpoint="/classify", status="200") == n
        ready = [k for k in s if k[0] == "normserve_model_ready" and dict(k[1]).get("model") == "gncnn"]
        assert len({dict(k[1])["pid"] for k in ready}) == 2, "both workers report readiness"
        assert re.search(r"normserve_requests_total\{", text)
