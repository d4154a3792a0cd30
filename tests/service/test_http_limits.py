"""HTTP limits under attack, over a real socket against a real `normserve serve` (loopback only,
every loop bounded in count and time): huge headers, slowloris, connections that say nothing,
bodies that never end or stop short, a declared body over the limit, a connection flood, a large
V2 JSON body. For each: the status (or the close), that the server stays live for other clients
(a health probe on a connection of its own answers within `PROBE_BOUND_S` throughout), and the
peak RSS of the server's process tree read from /proc.

The timeouts are set short here (`ENV`) to keep the suite fast; the defaults are in
service/settings.py. The probe bound is generous because this runs on loaded 2-core CI machines;
the latencies actually seen are printed (pytest -s) and reported in docs/limits-http.md.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import requests
from proctree import tree_rss
from servers import Server, running_server

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
MAX_CONNECTIONS = 64
MAX_BODY = 1024 * 1024  # small, so the over-limit cases send little
ENV = {
    "NORMSERVE_WORKERS": "1",
    "NORMSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "NORMSERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "NORMSERVE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "NORMSERVE_KEEP_ALIVE_TIMEOUT_S": "1",
    "NORMSERVE_MAX_BODY_BYTES": str(MAX_BODY),
    "NORMSERVE_MAX_DISCARD_BYTES": str(8 * MAX_BODY),
    "NORMSERVE_ACCESS_LOG": "false",
}
PROBE_BOUND_S = 1.0  # a health probe during an attack answers within this (seen: see the module doc)
SLACK_S = 2.0  # how much later than its timeout a connection may be closed on a loaded machine
RSS_GROWTH_BOUND = 256 * 1024 * 1024  # server tree peak RSS over its start-up RSS during one attack


# -- the server, its RSS and a health probe ----------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("limits") / "server.log", env=ENV) as s:
        yield s


def _port(server: Server) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def _request(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        return _read_until_close(s, time.monotonic() + timeout)


def _read_until_close(s: socket.socket, deadline: float) -> bytes:
    out = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not data:
            break
        out += data
    return out


LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


@dataclass
class Watch:
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    peak_rss: int = 0
    start_rss: int = 0

    @property
    def worst(self) -> float:
        return max(self.latencies, default=float("inf"))


@contextmanager
def watching(server: Server, label: str) -> Iterator[Watch]:
    """Probe /v2/health/live every 50 ms on a fresh connection and sample the server tree's RSS
    while the block runs; afterwards check both and print what was seen."""
    watch, stop, port = Watch(start_rss=tree_rss(server.process.pid)), threading.Event(), _port(server)
    watch.peak_rss = watch.start_rss

    def probe() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                answer = _request(port, LIVE, timeout=PROBE_BOUND_S * 5)
                if not answer.startswith(b"HTTP/1.1 200"):
                    watch.failures.append(answer[:80].decode(errors="replace"))
            except OSError as exc:
                watch.failures.append(repr(exc))
            watch.latencies.append(time.monotonic() - started)
            watch.peak_rss = max(watch.peak_rss, tree_rss(server.process.pid))
            stop.wait(0.05)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join(10)
    growth = (watch.peak_rss - watch.start_rss) / 2**20
    print(
        f"\n[{label}] probes {len(watch.latencies)}, worst {watch.worst * 1000:.0f} ms, "
        f"server tree RSS {watch.start_rss / 2**20:.0f} MiB -> peak {watch.peak_rss / 2**20:.0f} MiB "
        f"(+{growth:.0f}); loadavg {Path('/proc/loadavg').read_text().split()[:3]}"
    )
    assert not watch.failures, watch.failures[:3]
    assert watch.latencies and watch.worst < PROBE_BOUND_S, f"health probe took {watch.worst:.2f} s during {label}"
    assert watch.peak_rss - watch.start_rss < RSS_GROWTH_BOUND, f"server tree grew {growth:.0f} MiB during {label}"


def status_and_error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert b"application/json" in head.lower(), head
    return status, json.loads(body)["error"]


# -- the cases -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "header",
    [b"X-Big: " + b"a" * (256 * 1024) + b"\r\n", b"".join(b"X-%d: 1\r\n" % i for i in range(100_000))],
    ids=["one-256KiB-header", "100000-headers"],
)
def test_header_over_the_limit_is_431(server: Server, header: bytes) -> None:
    with watching(server, "huge header"), socket.create_connection(("127.0.0.1", _port(server)), timeout=5) as s:
        request = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n" + header + b"\r\n"
        try:  # in pieces until the server answers: it must not wait for the end of the block
            for start in range(0, len(request), 16384):
                s.sendall(request[start : start + 16384])
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_until_close(s, time.monotonic() + 5)
    status, error = status_and_error(answer)
    assert status == 431 and "16384 bytes" in error


def test_slowloris_connections_are_closed_within_the_header_timeout(server: Server) -> None:
    """60 connections trickling a header a byte at a time: each is answered 408 and closed within
    the header timeout (plus slack), while other clients are served."""
    port, n = _port(server), 60
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
    opened = time.monotonic()
    closed_after: dict[int, float] = {}
    answers: dict[int, bytes] = {}
    payload = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 200
    with watching(server, "slowloris x60"):
        for i in range(len(payload)):  # one byte per connection every 0.1 s, bounded by the payload
            for k, s in enumerate(socks):
                if k in closed_after:
                    continue
                try:
                    s.send(payload[i : i + 1])
                except OSError:
                    closed_after[k] = time.monotonic() - opened
            for k, s in enumerate(socks):
                if k in closed_after:
                    continue
                s.setblocking(False)
                try:
                    data = s.recv(65536)
                    answers[k] = answers.get(k, b"") + data
                    if not data or b"}" in data:
                        closed_after[k] = time.monotonic() - opened
                except BlockingIOError:
                    pass
                except OSError:
                    closed_after[k] = time.monotonic() - opened
                s.setblocking(True)
            if len(closed_after) == n or time.monotonic() - opened > HEADER_TIMEOUT_S + SLACK_S + 1:
                break
            time.sleep(0.1)
    for s in socks:
        s.close()
    assert len(closed_after) == n, f"{n - len(closed_after)} slowloris connections still open"
    latest = max(closed_after.values())
    print(f"[slowloris] all {n} closed, the last {latest:.2f} s after opening (header timeout {HEADER_TIMEOUT_S} s)")
    assert latest <= HEADER_TIMEOUT_S + SLACK_S
    answered = [status_and_error(a) for a in answers.values() if a.startswith(b"HTTP/1.1")]
    assert answered and all(status == 408 for status, _ in answered)


def test_a_connection_that_says_nothing_is_closed(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=5) as s:
        started = time.monotonic()
        assert _read_until_close(s, started + HEADER_TIMEOUT_S + SLACK_S + 1) == b""
        assert time.monotonic() - started <= HEADER_TIMEOUT_S + SLACK_S


@pytest.mark.parametrize(
    "head",
    [
        b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n0123456789",
        b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
    ids=["short-content-length", "chunked-that-stops"],
)
def test_body_that_never_completes_is_408(server: Server, head: bytes) -> None:
    with watching(server, "stalled body"), socket.create_connection(("127.0.0.1", _port(server)), timeout=5) as s:
        s.sendall(head)
        started = time.monotonic()
        answer = _read_until_close(s, started + BODY_TIMEOUT_S + SLACK_S + 1)
        waited = time.monotonic() - started
    status, error = status_and_error(answer)
    assert status == 408 and "body" in error
    assert BODY_TIMEOUT_S * 0.9 <= waited <= BODY_TIMEOUT_S + SLACK_S


def test_chunked_body_that_never_ends_is_413_then_closed(server: Server) -> None:
    """Chunks as fast as the socket takes them: 413 past the body limit, then the rest is read and
    thrown away up to the discard limit, then the connection is closed (bounded: 64 MiB sent at most)."""
    chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
    with watching(server, "endless chunked"), socket.create_connection(("127.0.0.1", _port(server)), timeout=5) as s:
        s.sendall(
            b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sent, answer, pending = 0, b"", memoryview(chunk)
        s.settimeout(0.0)
        while sent < 64 * 2**20:
            try:
                n = s.send(pending)
                sent += n
                pending = pending[n:] or memoryview(chunk)  # the chunk's rest first: the framing stays valid
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                break
            try:
                answer += s.recv(65536)
            except BlockingIOError:
                pass
            except OSError:
                break
        answer += _read_until_close(s, time.monotonic() + 2)
    assert sent < 64 * 2**20, "the server read 64 MiB without closing"
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert status_and_error(answer)[0] == 413


def test_declared_body_over_the_limit_is_413_not_a_reset(server: Server) -> None:
    """A client that sends its whole (over-limit) body before reading gets the 413, because the
    server reads and throws away the rest instead of closing on it."""
    size = 4 * MAX_BODY  # within the discard limit
    with watching(server, "declared 4x limit"), socket.create_connection(("127.0.0.1", _port(server)), timeout=5) as s:
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % size)
        s.sendall(b"\0" * size)  # a reset would raise here or on the read
        answer = _read_until_close(s, time.monotonic() + 1)
        status, error = status_and_error(answer)
        assert status == 413 and str(size) in error
        s.sendall(LIVE)  # and the connection is still good for the next request
        assert _read_until_close(s, time.monotonic() + 5).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("client", ["httpx", "requests"])
def test_declared_40_mib_over_the_discard_limit_is_413_then_closed(server: Server, client: str) -> None:
    """Past NORMSERVE_MAX_DISCARD_BYTES the 413 closes the connection instead of reading the body
    to throw it away; clients that send their whole body before reading (httpx, requests) get a
    write error, which they ignore, and then read the 413 that arrived before it."""
    size = 40 * 2**20
    url = server.base_url + "/classify"
    headers = {"content-type": "image/png"}
    with watching(server, f"declared 40 MiB, {client}"):
        for _ in range(3):
            if client == "httpx":
                r = httpx.post(url, content=bytes(size), headers=headers, timeout=30)
                status, error, connection = r.status_code, r.json()["error"], r.headers.get("connection")
            else:
                answer = requests.post(url, data=bytes(size), headers=headers, timeout=30)
                status, error = answer.status_code, answer.json()["error"]
                connection = answer.headers.get("connection")
            assert status == 413 and str(size) in error, (status, error)
            assert connection == "close"


def test_expect_100_continue_over_the_limit_is_413_at_once(server: Server) -> None:
    head = b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: %d\r\n" % (40 * 2**20)
    answer = _request(_port(server), head + b"Expect: 100-continue\r\n\r\n")
    assert status_and_error(answer)[0] == 413 and b"connection: close" in answer.lower()


def test_malformed_http_is_400_json(server: Server) -> None:
    status, error = status_and_error(_request(_port(server), b"GARBAGE \x00\x01\r\n\r\n"))
    assert status == 400 and "Invalid HTTP request" in error


def test_connections_past_the_cap_are_503_json(server: Server) -> None:
    port = _port(server)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        answer = _request(port, LIVE)
    finally:
        for s in idle:
            s.close()
    head, _, _ = answer.partition(b"\r\n\r\n")
    status, error = status_and_error(answer)
    assert status == 503 and "too many connections" in error and b"retry-after: 1" in head.lower()
    deadline = time.monotonic() + HEADER_TIMEOUT_S + SLACK_S  # served again once they are gone
    while not _request(port, LIVE).startswith(b"HTTP/1.1 200"):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_keep_alive_connection_closes_after_max_requests(server: Server) -> None:
    from normserve.service.settings import Settings

    cap = Settings(_env_file=None).keep_alive_max_requests  # type: ignore[call-arg]
    request = LIVE.replace(b"Connection: close\r\n", b"")
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=5) as s:
        s.sendall(request * cap)  # pipelined: one write, `cap` answers
        answers = _read_until_close(s, time.monotonic() + 20)
    assert answers.count(b"HTTP/1.1 200") == cap
    assert answers.lower().count(b"connection: close") == 1  # the last answer closes


def test_large_v2_json_body_does_not_stall_the_loop(server: Server) -> None:
    """V2 JSON bodies of ~0.4 MiB (over the inline threshold, within NORMSERVE_MAX_JSON_BYTES)
    are parsed in a thread, one at a time: health probes keep answering meanwhile."""
    values = ",".join(["0.5"] * (3 * 256 * 256 // 2))  # a (1, 3, 256, 256) tensor would not fit MAX_BODY; half of it
    body = ('{"inputs":[{"name":"image","shape":[1,3,128,256],"datatype":"FP32","data":[' + values + "]}]}").encode()
    assert len(body) <= MAX_BODY
    head = (
        b"POST /v2/models/in_autoencoder/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    )
    with watching(server, "V2 JSON"):
        for _ in range(3):
            answer = _request(_port(server), head % len(body) + body, timeout=30)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
