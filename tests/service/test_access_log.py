"""Request ids and the structured access log (service/access_log.py), over a real app."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import shipped
from conftest import ClientFactory
from fastapi.testclient import TestClient
from images import image_bytes

from normserve.service.access_log import LOGGER_NAME

PNG = {"content-type": "image/png"}
GENERATED = re.compile(r"[0-9a-f]{32}")
FIELDS = {
    "ts",
    "request_id",
    "method",
    "path",
    "route",
    "status",
    "latency_ms",
    "model",
    "version",
    "batch_size",
    "client",
    "error",
}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_lines() -> Iterator[list[logging.LogRecord]]:
    """Records of the access logger (which writes to stdout and does not propagate to the root
    logger, so a handler of the test's own listens to it directly)."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = _Collect()
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def _lines(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in records if r.name == LOGGER_NAME]


def test_request_id_is_generated_and_echoed(client: TestClient) -> None:
    first = client.get("/v2/health/live").headers["x-request-id"]
    second = client.get("/v2/health/live").headers["x-request-id"]
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second) and first != second


@pytest.mark.parametrize("given", ["abc", "req-42_x.Y", "A" * 128, "0f8fad5b-d9cb-469f-a165-70867728950e"])
def test_a_sane_client_request_id_is_kept(client: TestClient, given: str) -> None:
    assert client.get("/v2/health/live", headers={"x-request-id": given}).headers["x-request-id"] == given


@pytest.mark.parametrize("given", ["", "A" * 129, "has space", "a/b", "ümlaut", 'x"}{"injected": 1', "a\tb"])
def test_an_odd_client_request_id_is_replaced(
    client: TestClient, access_lines: list[logging.LogRecord], given: str
) -> None:
    echoed = client.get("/v2/health/live", headers={"x-request-id": given.encode()})
    assert GENERATED.fullmatch(echoed.headers["x-request-id"])
    [line] = _lines(access_lines)
    assert line["request_id"] == echoed.headers["x-request-id"]


def test_request_id_on_every_error(app_client: ClientFactory) -> None:
    client = app_client(api_key="secret", max_body_bytes=4096)
    answers = {
        401: client.post("/classify", content=image_bytes(32, 32), headers={**PNG, "x-request-id": "r401"}),
        404: client.get("/v2/models/nope", headers={"x-request-id": "r404"}),
        405: client.get("/classify", headers={"x-request-id": "r405"}),
        413: client.post("/classify", content=b"\0" * 5000, headers={**PNG, "x-request-id": "r413"}),
        422: client.post(
            "/classify?top_k=0",
            content=image_bytes(32, 32),
            headers={**PNG, "x-request-id": "r422", "authorization": "Bearer secret"},
        ),
    }
    for status, response in answers.items():
        assert response.status_code == status, (status, response.text)
        assert response.headers["x-request-id"] == f"r{status}"


def test_request_id_on_an_unhandled_500(app_client: ClientFactory) -> None:
    """A crash is answered by Starlette's outermost ServerErrorMiddleware, outside ours: the
    error handler adds the id there."""
    crashing = app_client()

    @crashing.app.get("/crash")  # type: ignore[attr-defined, untyped-decorator]
    async def crash() -> None:
        raise RuntimeError("boom")

    crashing.event_hooks = {"request": [], "response": []}  # a 500 is what this test wants
    response = crashing.get("/crash", headers={"x-request-id": "r500"})
    assert response.status_code == 500 and response.json() == {"error": "internal error (RuntimeError)"}
    assert response.headers["x-request-id"] == "r500"


def test_one_json_line_per_request(
    client: TestClient, access_lines: list[logging.LogRecord], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    ok = client.post("/classify", content=image_bytes(40, 30), headers={**PNG, "x-request-id": "line-1"})
    missing = client.get("/v2/models/nope/versions/3")
    bad = client.post("/reconstruct", content=b"not an image", headers={**PNG, "x-request-id": "line-3"})
    assert (ok.status_code, missing.status_code, bad.status_code) == (200, 404, 400)

    lines = _lines(access_lines)
    assert [line["request_id"] for line in lines] == ["line-1", missing.headers["x-request-id"], "line-3"]
    assert all(set(line) == FIELDS for line in lines), lines
    first, second, third = lines
    assert first | {"ts": None, "latency_ms": None, "version": None, "batch_size": None} == {
        "ts": None,
        "request_id": "line-1",
        "method": "POST",
        "path": "/classify",
        "route": "/classify",
        "status": 200,
        "latency_ms": None,
        "model": "gncnn",
        "version": None,
        "batch_size": None,
        "client": "testclient",
        "error": None,
    }
    # Set by the handling of the request where it knows them (the batcher, when present).
    assert first["version"] in (None, shipped.GNCNN) and first["batch_size"] in (None, 1)
    assert isinstance(first["latency_ms"], float) and first["latency_ms"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second["path"] == "/v2/models/nope/versions/3" and second["route"] == "/v2/models/{name}/versions/{version}"
    assert (second["status"], second["error"], second["model"]) == (404, "ModelNotFound", None)
    assert (third["status"], third["error"], third["model"]) == (400, "InvalidInput", None)

    # On stdout: exactly these lines, each one JSON object and nothing else.
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in out] == lines


def test_access_log_can_be_turned_off(app_client: ClientFactory, access_lines: list[logging.LogRecord]) -> None:
    quiet = app_client(access_log=False)
    response = quiet.get("/v2/health/live", headers={"x-request-id": "still-echoed"})
    assert response.headers["x-request-id"] == "still-echoed"
    assert _lines(access_lines) == []
