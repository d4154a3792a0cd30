"""wrk with the bench's Lua script against the real normserve: the bodies are accepted, the
summary is read back, statuses are counted when asked, and errors show up as errors."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client.parser import text_string_to_metric_families

from normserve.bench import cli
from normserve.bench.payloads import Workload
from normserve.bench.servers import ServerProcess
from normserve.bench.wrk import MARKER, Wrk, WrkError, parse_output

# A summary line as wrk.lua prints it (captured from a real run), inside wrk's own report.
CAPTURED = """Running 3s test @ http://127.0.0.1:8731/classify
  2 threads and 8 connections
Requests/sec:    118.48
BENCH_JSON {"requests":363,"duration_us":3063806,"bytes":197835,"errors":{"connect":0,"read":0,"write":0,"status":2,"timeout":1},"latency_us":{"min":47047,"max":218367,"mean":67715.2,"stdev":22608.4,"distinct":375,"percentiles":{"50":62010,"75":67543,"90":83901,"95":115814,"99":170431,"99.9":218367}},"accepted_p99_us":{"low":170000,"high":170431},"statuses":{"200":361,"503":2}}
"""


def _classify_200s(server: ServerProcess) -> float:
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = {"endpoint": "/classify", "status": "200"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "normserve_requests_total" and wanted.items() <= sample.labels.items():
                return sample.value
    return 0.0


def test_wrk_posts_multipart_classify_and_counts_statuses(
    wrk: Wrk, normserve_server: ServerProcess, workloads: dict[str, Workload]
) -> None:
    before = _classify_200s(normserve_server)
    result = wrk.run(normserve_server.base_url, workloads["classify"], 2, 1, count_statuses=True)
    deadline = time.monotonic() + 5.0  # the server counts a request just after answering it
    while (served := _classify_200s(normserve_server) - before) < result.requests and time.monotonic() < deadline:
        time.sleep(0.05)

    assert result.requests > 0
    assert result.error_count == 0, result.errors
    assert result.statuses == {200: result.requests}
    assert result.rejected_503 == 0
    assert 0.9 <= result.duration_s <= 3.0
    assert result.rps == pytest.approx(result.requests / result.duration_s)
    lat = result.latency_ms
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert result.accepted_p99_ms is not None  # no 503s: both bounds are the p99 itself
    assert result.accepted_p99_ms["low"] == result.accepted_p99_ms["high"] == pytest.approx(lat["p99"])
    # The server saw every request wrk counted (and perhaps a few in flight when wrk stopped).
    assert result.requests <= served <= result.requests + 2
    assert result.generator_cpu_s is not None and result.generator_cpu_s >= 0


class _Shedding(BaseHTTPRequestHandler):
    """Answers 503 at once to all but every 20th request, which gets a 200 after 20 ms: a
    load-shedding server whose accepted responses are all slower than its rejections."""

    protocol_version = "HTTP/1.1"
    counter = itertools.count()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        accepted = next(self.counter) % 20 == 0
        if accepted:
            time.sleep(0.02)
        self.send_response(200 if accepted else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # wrk drops its connections mid-request when its time is up


@pytest.fixture
def shedding_url() -> Iterator[str]:
    server = _QuietServer(("127.0.0.1", 0), _Shedding)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_accepted_p99_bounds_bracket_the_accepted_responses(
    wrk: Wrk, shedding_url: str, workloads: dict[str, Workload]
) -> None:
    # Thousands of fast 503s share far fewer distinct latency values than there are responses:
    # bounds computed from the count of distinct values (wrk's `#latency`) came out null here.
    result = wrk.run(shedding_url, workloads["classify"], 2, 1, count_statuses=True)
    assert result.statuses is not None and result.rejected_503 is not None
    assert result.rejected_503 > result.statuses.get(200, 0) > 0
    bounds = result.accepted_p99_ms
    assert bounds is not None
    # The accepted p99 is one of the 200s (each took >= 20 ms); the lower bound falls among the
    # fast 503s and the upper one among the 200s.
    assert bounds["low"] < 20.0 <= bounds["high"]


def test_wrk_posts_v2_binary_without_status_hook(
    wrk: Wrk, normserve_server: ServerProcess, workloads: dict[str, Workload]
) -> None:
    result = wrk.run(normserve_server.base_url, workloads["v2"], 2, 1)
    assert result.requests > 0
    assert result.error_count == 0, result.errors
    assert result.statuses is None and result.accepted_p99_ms is None


def test_wrk_reports_http_errors_as_errors(
    wrk: Wrk, normserve_server: ServerProcess, workloads: dict[str, Workload]
) -> None:
    broken = dataclasses.replace(
        workloads["classify"], body=b"this is not an image", headers={"Content-Type": "image/png"}
    )
    result = wrk.run(normserve_server.base_url, broken, 2, 1, count_statuses=True)
    assert result.requests > 0
    assert result.errors["status"] == result.requests  # every answer was a 400
    assert result.statuses == {400: result.requests}
    assert result.to_dict()["other_errors"] == result.requests


def test_parse_output_reads_the_summary_line() -> None:
    r = parse_output(CAPTURED, concurrency=8, threads=2)
    assert r.requests == 363
    assert r.duration_s == pytest.approx(3.063806)
    assert r.rps == pytest.approx(363 / 3.063806)
    assert r.latency_ms["p50"] == pytest.approx(62.010)
    assert r.latency_ms["p99"] == pytest.approx(170.431)
    assert r.latency_ms["p99.9"] == pytest.approx(218.367)
    assert r.latency_ms["mean"] == pytest.approx(67.7152)
    assert r.errors == {"connect": 0, "read": 0, "write": 0, "status": 2, "timeout": 1}
    assert r.error_count == 3
    assert r.statuses == {200: 361, 503: 2}
    assert r.rejected_503 == 2
    assert r.accepted_p99_ms == {"low": 170.0, "high": 170.431}
    assert r.to_dict()["other_errors"] == 1


def test_parse_output_without_summary_says_what_wrk_printed() -> None:
    with pytest.raises(WrkError, match="unable to connect"):
        parse_output("unable to connect to 127.0.0.1:1 Connection refused\n", 1, 1)
    with pytest.raises(WrkError, match="not valid JSON"):
        parse_output(MARKER + "{not json\n", 1, 1)


def test_bench_without_wrk_fails_with_install_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli.main(["--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "wrk" in err and "apt-get install wrk" in err and "scripts/install-wrk.sh" in err
