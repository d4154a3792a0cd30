"""Graceful shutdown: SIGTERM under load loses no accepted request.

The real `normserve serve` runs in a subprocess; eight clients post real images to /classify and
/reconstruct over keep-alive connections, as fast as they are answered. Mid-load the server gets
SIGTERM. Then:

- readiness goes off at once (503, or connection refused once the listener is closed);
- every request the server accepted gets its answer, and it is a 200: a request that was sent and
  got no response (connection reset, server disconnected, read error) is a failure; only a refused
  connection (`httpx.ConnectError`, nothing was sent) counts as "not accepted";
- every client got at least one 200 after the signal (in-flight and queued requests finish);
- the process exits within the grace period, after the lifespan's shutdown.

The drain logic itself (readiness off, `Connection: close` while draining) is also checked in
process, without signals.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import shipped
from conftest import ClientFactory
from images import image_bytes
from servers import Server, start_server, stop_server

from normserve.service.state import server_state

GRACE_S = 20.0  # generous: the drain takes well under a second, but the CI machine may be busy
CLIENTS = 8
WARM_RESPONSES = 2  # per client, before the signal
READY_OFF_WITHIN_S = 10.0  # with workers, the supervisor has to pass the signal on first


@dataclass
class Outcome:
    client: int
    finished: float  # time.monotonic() when the answer (or the error) came
    status: int | None = None  # the HTTP status, when a response came
    error: str | None = None  # the exception, when none came

    @property
    def accepted(self) -> bool:
        """Refused connections are the only requests the server never saw."""
        return self.error != "ConnectError"


def _client(server: Server, index: int, stop: threading.Event, outcomes: list[Outcome]) -> None:
    route = "/classify" if index % 2 == 0 else "/reconstruct"
    body = image_bytes(48 + 8 * index, 40 + 4 * index)
    timeout = httpx.Timeout(60.0, connect=10.0)
    with httpx.Client(base_url=server.base_url, timeout=timeout) as client:  # one keep-alive connection
        while not stop.is_set():
            try:
                response = client.post(route, content=body, headers={"content-type": "image/png"})
            except httpx.ConnectError:
                outcomes.append(Outcome(index, time.monotonic(), error="ConnectError"))
                return  # the server no longer accepts connections: this client is done
            except httpx.TransportError as exc:  # sent, and no answer came
                outcomes.append(Outcome(index, time.monotonic(), error=f"{type(exc).__name__}: {exc}"))
                return
            outcomes.append(Outcome(index, time.monotonic(), status=response.status_code))


def _not_ready(server: Server) -> bool:
    """A probe's view: 503, refused or reset (a worker stopped listening with it queued)."""
    try:
        return httpx.get(f"{server.base_url}/v2/health/ready", timeout=10.0).status_code == 503
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_loses_no_accepted_request(tmp_path: Path, workers: int) -> None:
    server = start_server(
        tmp_path / "server.log",
        "--workers",
        str(workers),
        env={"NORMSERVE_SHUTDOWN_GRACE_S": str(GRACE_S), "NORMSERVE_ACCESS_LOG": "false"},
    )
    stop = threading.Event()
    outcomes: list[Outcome] = []
    threads = [threading.Thread(target=_client, args=(server, i, stop, outcomes)) for i in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = [sum(o.client == i and o.status == 200 for o in outcomes) for i in range(CLIENTS)]
            if min(done) >= WARM_RESPONSES:
                break
            assert all(o.status == 200 for o in outcomes), outcomes
            time.sleep(0.05)
        else:
            raise AssertionError(f"load did not start: {outcomes}")

        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # One process sets the drain in its signal handler, before its event loop reads another
        # request: the first probe after the signal already sees it. With workers, the
        # supervisor passes the signal on as soon as it runs.
        while not _not_ready(server):
            assert workers > 1, "a single server process answered ready after SIGTERM"
            assert time.monotonic() - signalled < READY_OFF_WITHIN_S, f"still ready {READY_OFF_WITHIN_S}s after SIGTERM"
            time.sleep(0.02)
        assert _not_ready(server), "ready again after it went off"

        returncode = server.process.wait(GRACE_S + 15)
        exited_after = time.monotonic() - signalled
        stop.set()
        for t in threads:
            t.join(30)
        log = server.log_text()

        failures = [o for o in outcomes if o.accepted and o.status != 200]
        assert not failures, f"accepted requests that failed: {failures}\n{log}"
        for i in range(CLIENTS):
            mine = [o for o in outcomes if o.client == i]
            assert mine[-1].error == "ConnectError", (i, mine[-3:])  # it stopped because new work was refused
            assert any(o.status == 200 and o.finished > signalled for o in mine), (i, mine[-3:], log)
        assert exited_after < GRACE_S, f"exited {exited_after:.1f}s after SIGTERM; grace is {GRACE_S}s"
        assert returncode in (0, -signal.SIGTERM), log  # uvicorn re-raises the signal after a clean drain
        assert log.count("normserve: stopped") == workers, log  # every lifespan shut down
        assert "Traceback" not in log and "timeout graceful shutdown exceeded" not in log, log
    finally:
        stop.set()
        stop_server(server)
        for t in threads:
            t.join(30)


def test_draining_turns_readiness_off_and_closes_connections(app_client: ClientFactory) -> None:
    client = app_client(allow_503=True)
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/health/ready").headers.get("connection") != "close"

    server_state(client.app).drain.start()  # what the server does first on SIGTERM
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 503
    assert ready.json()["ready"] is False and ready.json()["reason"] == "server is shutting down"
    assert ready.headers["connection"] == "close"
    for path in ("/v2/models/gncnn/ready", f"/v2/models/gncnn/versions/{shipped.GNCNN}/ready"):
        model = client.get(path)
        assert model.status_code == 503 and model.json()["ready"] is False, model.text
        assert model.json()["reason"] == "server is shutting down"
    # Requests already on their way are still served, each telling the client to go away after.
    served = client.post("/classify", content=image_bytes(32, 32), headers={"content-type": "image/png"})
    assert served.status_code == 200 and served.headers["connection"] == "close"
    assert client.get("/v2/health/live").status_code == 200
    assert server_state(client.app).drain.in_flight == 0
