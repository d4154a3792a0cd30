"""End to end: `normserve serve` as a real process on a free port, real HTTP over a socket, and a
clean exit on SIGINT / SIGTERM. The server process is always killed in teardown."""

from __future__ import annotations

import base64
import io
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import shipped
from bad_inputs import BAD_REQUESTS
from images import encode, image_bytes, noise
from PIL import Image
from servers import EXIT_TIMEOUT_S, Server, start_server, stop_server

pytestmark = pytest.mark.e2e

BODY_LIMIT = 1 << 20  # NORMSERVE_MAX_BODY_BYTES for the server, small enough to exceed cheaply
SERVER_ENV = {"NORMSERVE_MAX_BODY_BYTES": str(BODY_LIMIT)}


def no_5xx(response: httpx.Response) -> None:
    if response.status_code >= 500:
        response.read()
        raise AssertionError(f"{response.request.url} answered {response.status_code}: {response.text}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("e2e") / "server.log", env=SERVER_ENV)
    try:
        yield running
    finally:
        stop_server(running)


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30.0, event_hooks={"response": [no_5xx]}) as client:
        yield client


def test_ready_over_http(http: httpx.Client) -> None:
    body = http.get("/v2/health/ready").json()
    assert body["ready"] is True
    assert {m["name"] for m in body["models"]} == {"gncnn", "in_autoencoder"}


def test_classify_over_http(http: httpx.Client) -> None:
    response = http.post("/classify?top_k=10", files={"file": ("photo.png", image_bytes(64, 48), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["input"] == {"width": 64, "height": 48, "format": "PNG"}
    probabilities = [p["probability"] for p in body["predictions"]]
    assert len(probabilities) == 10
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)


def test_features_over_http(http: httpx.Client, repo_root: Path) -> None:
    config = shipped.config("gncnn")
    response = http.post("/features?resize=false", content=image_bytes(60, 40), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    levels = response.json()["levels"]
    # Stride-s levels of a 40x60 image are ceil(40/s) x ceil(60/s): 40x60, 20x30, 10x15 for strides 1, 2, 4.
    expected = [
        [1, lv["channels"], math.ceil(40 / lv["stride"]), math.ceil(60 / lv["stride"])] for lv in config["feature_info"]
    ]
    assert [lv["shape"] for lv in levels] == expected
    for lv in levels:
        data = np.frombuffer(base64.b64decode(lv["data"]), dtype="<f4")
        assert data.size == math.prod(lv["shape"]) and np.isfinite(data).all()


def test_reconstruct_over_http(http: httpx.Client) -> None:
    response = http.post("/reconstruct", content=image_bytes(53, 37), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as img:
        assert (img.format, img.size) == ("PNG", (53, 37))


def test_chunked_body_over_the_limit_over_a_socket(http: httpx.Client) -> None:
    # A real chunked upload (no Content-Length): the limit is enforced while streaming.
    def chunks() -> Iterator[bytes]:
        for _ in range(2 * BODY_LIMIT // 65536):
            yield b"\0" * 65536

    response = http.post("/classify", content=chunks(), headers={"content-type": "image/png"})
    assert response.status_code == 413
    assert str(BODY_LIMIT) in response.json()["error"]
    assert http.get("/v2/health/live").status_code == 200


def _memory_mib(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MiB of the server process and its children, read from /proc."""
    pids, rss, peak = [pid], 0.0, 0.0
    while pids:
        p = pids.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except FileNotFoundError:
            continue  # gone meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss += int(fields["VmRSS"].split()[0]) / 1024
        peak += int(fields["VmHWM"].split()[0]) / 1024
        pids += [int(c) for c in children]
    return rss, peak


def test_bad_input_corpus_over_a_socket_keeps_serving_in_bounded_memory(server: Server, http: httpx.Client) -> None:
    """Every bad request of the corpus, three times on every image route of a real server: each a
    JSON 4xx naming the problem (the http client fails any 5xx), the server alive and serving after,
    no memory spike (the header bomb is refused before decoding) and no growth from round to round."""
    routes = ["/classify", "/features", "/reconstruct"]
    for route in routes:  # warm: buffers a good request allocates exist before the baseline
        assert http.post(route, content=image_bytes(32, 32), headers={"content-type": "image/png"}).status_code == 200
    rss_start, peak_start = _memory_mib(server.process.pid)
    rss_after_round = []
    for _ in range(3):
        for route in routes:
            for case_id, kwargs, status, fragments in BAD_REQUESTS:
                response = http.post(route, **kwargs)
                assert response.status_code == status, (route, case_id, response.text)
                message = response.json()["error"].lower()
                assert all(f.lower() in message for f in fragments), (route, case_id, message)
        rss_after_round.append(_memory_mib(server.process.pid)[0])
    rss_end, peak_end = _memory_mib(server.process.pid)
    assert peak_end - peak_start < 64, f"peak RSS grew {peak_end - peak_start:.0f} MiB (from {peak_start:.0f})"
    assert rss_after_round[-1] - rss_after_round[0] < 16, f"RSS after each round: {rss_after_round}"
    assert rss_end - rss_start < 64
    response = http.post("/classify", content=image_bytes(32, 32), headers={"content-type": "image/png"})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 5


def test_concurrent_requests(server: Server) -> None:
    # Several clients at once through the single inference thread: all answered, none mixed up.
    sizes = [(20 + i, 30 + 2 * i) for i in range(6)]
    results: dict[tuple[int, int], tuple[int, tuple[int, int]]] = {}

    def one(size: tuple[int, int]) -> None:
        data = encode(Image.fromarray(noise(*size, seed=size[0])), "PNG")
        with httpx.Client(base_url=server.base_url, timeout=60.0) as c:
            r = c.post("/reconstruct", content=data, headers={"content-type": "image/png"})
        results[size] = (r.status_code, Image.open(io.BytesIO(r.content)).size if r.status_code == 200 else (0, 0))

    threads = [threading.Thread(target=one, args=(s,)) for s in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {s: (200, s) for s in sizes}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_shuts_down_cleanly(repo_root: Path, tmp_path: Path, sig: signal.Signals) -> None:
    server = start_server(tmp_path / "server.log", env=SERVER_ENV)
    try:
        response = httpx.post(
            f"{server.base_url}/classify", content=image_bytes(32, 32), headers={"content-type": "image/png"}
        )
        assert response.status_code == 200
        started = time.monotonic()
        server.process.send_signal(sig)
        returncode = server.process.wait(EXIT_TIMEOUT_S)
        assert time.monotonic() - started < EXIT_TIMEOUT_S
        log = server.log_text()
        # uvicorn re-raises the signal once its graceful shutdown is done, so the status is
        # 0 or "killed by that signal" (143 to a shell, what Kubernetes expects after SIGTERM);
        # the log shows whether the shutdown was graceful.
        assert returncode in (0, -sig), log
        assert "normserve: stopped" in log  # the lifespan's shutdown ran (sessions released)
        assert "Application shutdown complete" in log
        assert "Traceback" not in log
        with pytest.raises(httpx.TransportError):  # and the port is closed
            httpx.get(f"{server.base_url}/v2/health/live", timeout=2.0)
    finally:
        stop_server(server)
