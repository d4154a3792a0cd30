"""ASGI middleware: the request-body limit, enforced while the body is read (never after
buffering an unbounded body)."""

from __future__ import annotations

import orjson
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from normserve.service.errors import PayloadTooLarge
from normserve.service.governor import BODY_LENGTH_KEY


class BodySizeLimitMiddleware:
    """413 when Content-Length or the streamed body exceeds `max_bytes`.

    A declared length over the limit is refused before reading; a chunked or lying body raises
    `PayloadTooLarge` from `receive` as soon as the count passes the limit, which the error
    handlers turn into the usual JSON 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, discard_bytes: int = 0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # A declared body up to this size (NORMSERVE_MAX_DISCARD_BYTES) is answered on a
        # connection kept open: the server reads and throws away the rest (service/http_limits.py).
        # Larger, or sent after `Expect: 100-continue` (the client waits and sends nothing), the
        # answer closes the connection and the rest is never read: a client that sends its whole
        # body before reading (httpx, requests, curl) ignores the failed write and reads the 413.
        self.discard_bytes = discard_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        header = headers.get(b"content-length")
        declared = int(header) if header is not None and header.isdigit() else None
        if declared is not None and declared > self.max_bytes:
            close = declared > self.discard_bytes or headers.get(b"expect", b"").lower() == b"100-continue"
            message = f"request body of {declared} bytes exceeds the limit of {self.max_bytes} bytes"
            await _reject(send, message, close)
            return
        seen, done = 0, False

        async def limited_receive() -> Message:
            nonlocal seen, done
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
            return message

        if declared is None and b"transfer-encoding" not in headers:
            declared = 0  # no body
        scope[BODY_LENGTH_KEY] = declared  # for the governor, inside
        if declared is not None and declared <= self.discard_bytes:  # (most requests) whatever is left is read
            await self.app(scope, limited_receive, send)
            return

        async def closing_send(message: Message) -> None:
            """An answer that leaves more of the body unread than the server throws away (a chunked
            body over the limit, an upload answered 401 or 404 unread) says Connection: close, so
            the client does not send its next request on a connection about to close."""
            if message["type"] == "http.response.start" and not done:
                left = None if declared is None else declared - seen  # chunked: unknown
                headers = message.get("headers", [])
                if (left is None or left > self.discard_bytes) and _CLOSE not in headers:
                    message = {**message, "headers": [*headers, _CLOSE]}
            await send(message)

        await self.app(scope, limited_receive, closing_send)


_CLOSE = (b"connection", b"close")


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
