"""BodySizeLimitMiddleware: which answers close the connection. An answer that leaves more of the
body unread than NORMSERVE_MAX_DISCARD_BYTES says `Connection: close` (the server will not read
the rest), so that a client does not send its next request on a connection about to close; one
that leaves less, or reads everything, keeps it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient
from starlette.types import Message

from normserve.service.errors import register_error_handlers
from normserve.service.middleware import BodySizeLimitMiddleware

LIMIT, DISCARD = 4 << 20, 256 << 10


def client(max_bytes: int = LIMIT, discard_bytes: int = DISCARD) -> TestClient:
    """An app with the service's error handlers behind the middleware: POST /read reads the whole
    body, as the routes do; POST /unread answers without reading it (a 401, say)."""
    app = FastAPI()
    register_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_bytes, discard_bytes=discard_bytes)

    @app.post("/read")
    async def read(request: Request) -> Response:
        await request.body()
        return Response(b"ok")

    @app.api_route("/unread", methods=["GET", "POST"])
    async def unread() -> Response:
        return Response(b"ok")

    @app.post("/unread-closing")  # says it itself, as the governor's budget refusals do
    async def unread_closing() -> Response:
        return Response(b"ok", headers={"connection": "close"})

    return TestClient(app)


def chunks(n: int) -> Iterator[bytes]:
    for _ in range(n // 65536):
        yield bytes(65536)


@pytest.mark.parametrize(
    ("body", "read", "closes"),
    [
        (None, False, False),  # no body
        (bytes(DISCARD), False, False),  # unread, but within what is thrown away
        (bytes(DISCARD + 1), False, True),  # unread, more than that: 401/404 to an upload
        (bytes(LIMIT), True, False),  # read to the end
        ("chunked", False, True),  # unread, length unknown
        ("chunked", True, False),
    ],
)
def test_connection_close_when_the_unread_rest_passes_the_discard_limit(
    body: bytes | str | None, read: bool, closes: bool
) -> None:
    content = chunks(2 * DISCARD) if body == "chunked" else body
    path = "/read" if read else "/unread"
    with client() as c:
        r = c.post(path, content=content) if content is not None else c.get(path)
    assert r.status_code == 200 and r.content == b"ok"
    assert (r.headers.get("connection") == "close") == closes, r.headers


def test_connection_close_is_said_once() -> None:
    with client() as c:
        r = c.post("/unread-closing", content=bytes(DISCARD + 1))
    assert r.headers.get_list("connection") == ["close"]


@pytest.mark.parametrize(("more_after_limit", "closes"), [(True, True), (False, False)])
def test_chunked_body_over_the_limit_is_413_and_closes_if_more_is_coming(more_after_limit: bool, closes: bool) -> None:
    """Chunks arriving one message at a time, as from a socket: the 413 comes once they pass the
    limit; when more of the body is still coming, it says Connection: close (the server will not
    read it all), when the message that passed the limit was the last, nothing is left to close for."""
    sent: list[Message] = []
    n = LIMIT // 65536 + 1

    async def receive() -> Message:
        nonlocal n
        n -= 1
        return {"type": "http.request", "body": bytes(65536), "more_body": more_after_limit or n > 0}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/read",
        "raw_path": b"/read",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"t"), (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    with client() as c:
        asyncio.run(c.app(scope, receive, send))  # type: ignore[arg-type]
    start = sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 413
    assert ((b"connection", b"close") in start["headers"]) == closes, start["headers"]


@pytest.mark.parametrize(("discard", "closes"), [(LIMIT, False), (LIMIT - 1, True)])
def test_declared_body_over_the_limit_is_413_and_closes_past_the_discard_limit(discard: int, closes: bool) -> None:
    with client(max_bytes=LIMIT - 1, discard_bytes=discard) as c:
        r = c.post("/read", content=bytes(LIMIT))
    assert r.status_code == 413 and str(LIMIT) in r.json()["error"]
    assert (r.headers.get("connection") == "close") == closes
