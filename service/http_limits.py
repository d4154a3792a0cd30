"""HTTP/1.1 limits uvicorn does not enforce itself, on its httptools protocol.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) and requests in flight per
worker (`limit_concurrency`, answered 503), and both are used as they are. What it lacks on
httptools, the parser it picks by default:

- a limit on the size of the request line and headers (h11 has `h11_max_incomplete_event_size`;
  httptools/llhttp has none: a 128 MiB header block was accepted). Here: 431 once the bytes read
  for an unfinished header block pass `max_header_bytes` (checked per read, so at most one read,
  64-256 KiB, past the limit is ever buffered; a block that begins after pipelined requests in
  the same read counts from that read's last blank line);
- a header read timeout: `timeout_keep_alive` is cancelled by the first byte of a request, so a
  client trickling a header a byte at a time held its connection forever (slowloris; uvicorn
  issue #157, the xorbits/inference and vLLM fixes). Here: 408 when the header block is not
  complete `header_timeout_s` after the connection opened or the request began;
- a body read timeout: a Content-Length larger than what is sent, or a chunked body that never
  ends, waited forever. Here: 408 (or a plain close once a response has started) when the body
  is not complete `body_timeout_s` after its header;
- a bound on what is read and thrown away after an early answer (a 413 for a body over the
  limit): uvicorn goes on reading and discarding the rest of the body, on the event loop, to keep
  the connection; past `max_discard_bytes` (256 KiB, Go net/http's `maxPostHandlerReadBytes`) the
  connection is closed instead. A declared body whose rest is longer is answered with
  `Connection: close` at once (service/middleware.py); a client that sends its whole body before
  it reads (httpx, requests, curl) gets a write error, ignores it, and reads the 413, which
  arrived first;
- a cap on requests per keep-alive connection (`keep_alive_max_requests`, nginx's
  `keepalive_requests`): the last response says `Connection: close`.

It also tells the app at once when a client goes away before its answer is complete: each
request's scope carries a `DisconnectHook` (service/governor.py), called from `connection_lost`,
so the governor cancels the request's work without a watcher task per request.

Protocol-level answers (431, 408, 400 for unparsable HTTP, the 503 of `limit_concurrency`) are
JSON `{"error": ...}` like every other answer, with `Connection: close`. They are written
directly by the protocol and never reach the app, so they have no access-log line, no request
id and no metrics sample.

The checks add no timer on the common path: a request whose header and body arrive in one read
arms nothing; only a request still incomplete after a read arms its timer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from normserve.service.governor import DISCONNECT_HOOK_KEY, DisconnectHook
from normserve.service.settings import Settings


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_discard_bytes: int = 256 * 1024
    keep_alive_max_requests: int = 1000  # 0: no cap

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_discard_bytes=settings.max_discard_bytes,
            keep_alive_max_requests=settings.keep_alive_max_requests,
        )


def error_bytes(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response `{"error": message}` that closes the connection."""
    body = orjson.dumps({"error": message})
    head = b"content-type: application/json\r\nconnection: close\r\ncontent-length: " + str(len(body)).encode()
    return STATUS_LINE[status] + head + b"\r\n\r\n" + body


async def _unavailable(scope: Any, receive: Any, send: Any) -> None:
    """uvicorn's `limit_concurrency` answer, as JSON."""
    body = orjson.dumps({"error": "too many connections or requests in flight on this worker; retry shortly"})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"retry-after", b"1"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; `config.http_limits` (an `HttpLimits`,
    set by `normserve serve`) configures it, else the defaults."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: HttpLimits = getattr(config, "http_limits", None) or HttpLimits()
        self._in_header = False  # a request has begun and its header block is not complete
        self._in_body = False  # its header is complete and its body is not
        self._header_bytes = 0
        self._begun_here = False  # a request began in the read being parsed
        self._discarded = 0
        self._requests = 0
        self._read_timer: asyncio.TimerHandle | None = None

    # -- timers ----------------------------------------------------------------------------------
    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _header_timeout(self) -> None:
        self._read_timer = None
        if self._in_header:
            self._refuse(408, f"request header not received within {self.limits.header_timeout_s:g} s")
        elif not self.transport.is_closing():
            self.transport.close()  # connected and never sent a byte

    def _body_timeout(self) -> None:
        self._read_timer = None
        if not self._in_body or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.disconnected = True  # the app's receive() gets http.disconnect, its answer is dropped
            cycle.message_event.set()
            self._refuse(408, f"request body not received within {self.limits.body_timeout_s:g} s")
        else:
            self.transport.close()  # answered already (an early 413, say): nothing more to say

    def _refuse(self, status: int, message: str) -> None:
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "client"
        self.logger.warning("%s: %d %s", client, status, message)
        self.transport.write(error_bytes(status, message))
        self.transport.close()

    # -- protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._header_timeout)  # a connection that says nothing

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            hook = cycle.scope.get(DISCONNECT_HOOK_KEY)
            if isinstance(hook, DisconnectHook) and hook.callback is not None:
                hook.callback()

    def data_received(self, data: bytes) -> None:
        if self._in_body and self.cycle is not None and self.cycle.response_complete:
            self._discarded += len(data)  # the rest of a body already answered: read and thrown away
            if self._discarded > self.limits.max_discard_bytes:
                self.transport.close()
                return
        self._begun_here = False
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._in_header:
            if self._begun_here:  # after other requests in this read (pipelining): only what follows
                end = data.rfind(b"\r\n\r\n")  # the last header block ended; this one has no blank line
                self._header_bytes = len(data) - (end + 4 if end >= 0 else 0)
            else:
                self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(431, f"request header larger than the limit of {self.limits.max_header_bytes} bytes")
            elif self._read_timer is None:
                self._arm(self.limits.header_timeout_s, self._header_timeout)
        elif self._in_body and self._read_timer is None:
            self._arm(self.limits.body_timeout_s, self._body_timeout)

    def send_400_response(self, msg: str) -> None:
        self.transport.write(error_bytes(400, msg))
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[DISCONNECT_HOOK_KEY] = DisconnectHook()  # type: ignore[literal-required]
        self._in_header, self._header_bytes, self._discarded, self._begun_here = True, 0, 0, True

    def on_headers_complete(self) -> None:
        self._in_header = False
        self._disarm()
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous:  # a request for the app (not an upgrade)
            self._in_body = True
            self._requests += 1
            cap = self.limits.keep_alive_max_requests
            if cap and self._requests >= cap:
                self.cycle.keep_alive = False  # its response says Connection: close

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm()
        super().on_message_complete()
        # The body is all read: read on, so that a client that goes away is seen at once
        # (connection_lost calls the request's DisconnectHook). uvicorn pauses reading while a
        # body past its high-water mark waits for the app, and resumes only when the app next
        # calls receive(). A pipelined request waiting its turn keeps reading paused.
        if not self.pipeline:
            self.flow.resume_reading()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        super()._start_asgi_task(cycle, _unavailable if app is service_unavailable else app)
