"""ASGI middleware: the request-body limit, enforced while the body is read (never after
buffering an unbounded body)."""

from __future__ import annotations

import orjson
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from normserve.service.errors import PayloadTooLarge


class BodySizeLimitMiddleware:
    """413 when Content-Length or the streamed body exceeds `max_bytes`.

    A declared length over the limit is refused before reading; a chunked or lying body raises
    `PayloadTooLarge` from `receive` as soon as the count passes the limit, which the error
    handlers turn into the usual JSON 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, discard_bytes: int = 0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # A declared body up to this size is answered on a connection kept open: the server reads
        # and throws away the rest (service/http_limits.py), so a client that sends its whole body
        # before reading gets the 413 instead of a reset. Larger, or sent after `Expect:
        # 100-continue` (the client waits and sends nothing), the answer closes the connection.
        self.discard_bytes = discard_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            close = int(declared) > self.discard_bytes or headers.get(b"expect", b"").lower() == b"100-continue"
            message = f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes} bytes"
            await _reject(send, message, close)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _reject(send: Send, message: str, close: bool) -> None:
    body = orjson.dumps({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, whose refused preflight (400 "Disallowed CORS origin") answers
    `{"error": ...}` like every other error; the CORS headers stay as Starlette sets them."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        message = bytes(response.body).decode()
        keep = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        return JSONResponse({"error": f"{message} (NORMSERVE_CORS_ORIGINS)"}, response.status_code, keep)
