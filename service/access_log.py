"""Request ids and the structured access log: one JSON line per HTTP request.

`AccessLogMiddleware` is the outermost middleware, so it sees every response (413s from the body
limit and CORS preflights included) with its final status. It:

- takes the client's `X-Request-ID` when it is sane (1-128 characters of `A-Za-z0-9._-`), else
  makes one (uuid4 hex), so a hostile or malformed id never reaches the log or another system;
- puts it in `request.state.request_id` and echoes it on every response;
- with `access_log` on, logs one JSON line on the `normserve.access` logger when the response is
  done: ts, request_id, method, path, route (the template), status, latency_ms, model, version,
  batch_size, client, error; with tracing on (service/tracing.py) also trace_id and span_id, the
  request's server span (null for a request that is not traced, such as a health probe).

The model, version and batch size come from what the request's handling left in
`request.state` (`model`, `model_version`, `batch_size`): null where the request ran no model.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
LOGGER_NAME = "normserve.access"
_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_HANDLER_NAME = "normserve-access-json"

access_log = logging.getLogger(LOGGER_NAME)


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is sane, else a fresh uuid4 hex."""
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SANE_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class _StdoutHandler(logging.Handler):
    """One line per record on whatever `sys.stdout` is now (test runners swap it), flushed so
    that a container's log collector gets each line when it happens."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def configure_access_logger() -> None:
    """JSON lines on stdout, message only, apart from the service log (stderr, with prefixes).
    Idempotent: every app built in one process shares the logger."""
    if any(h.get_name() == _HANDLER_NAME for h in access_log.handlers):
        return
    handler = _StdoutHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


def _route(scope: Scope) -> str | None:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path is not None else None


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


class AccessLogMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        enabled: bool = True,
        trace_ids: Callable[[], tuple[str | None, str | None]] | None = None,
    ) -> None:
        self.app = app
        self.enabled = enabled
        self.trace_ids = trace_ids  # with tracing on: the current (server) span's trace and span id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"])
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        error: str | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # answered by Starlette's ServerErrorMiddleware, outside us: a 500
            error = type(exc).__name__
            raise
        finally:
            if self.enabled:
                latency_ms = (time.perf_counter() - started) * 1000
                if error is None and status >= 400:
                    error = str(state.get("error") or f"http_{status}")
                self._log(scope, state, request_id, status, latency_ms, error)

    def _log(
        self, scope: Scope, state: dict[str, Any], request_id: str, status: int, latency_ms: float, error: str | None
    ) -> None:
        log_request(
            request_id=request_id,
            method=scope.get("method"),
            path=scope.get("path"),
            route=_route(scope),
            status=status,
            latency_ms=latency_ms,
            state=state,
            client=_client(scope),
            error=error,
            **(dict(zip(("trace_id", "span_id"), self.trace_ids(), strict=True)) if self.trace_ids else {}),
        )


def log_request(
    *,
    request_id: str,
    method: str | None,
    path: str | None,
    route: str | None,
    status: int,
    latency_ms: float,
    state: Mapping[str, Any],
    client: str | None,
    error: str | None,
    **extra: Any,
) -> None:
    """One access-log line; HTTP and gRPC (service/grpc_server.py) write the same fields."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    record = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": request_id,
        "method": method,
        "path": path,
        "route": route,
        "status": status,
        "latency_ms": round(latency_ms, 3),
        "model": state.get("model"),
        "version": state.get("model_version"),
        "batch_size": state.get("batch_size"),
        "client": client,
        "error": error,
        **extra,
    }
    # The record is made here rather than by `access_log.info()`, which would also look up the
    # caller's file and line through the stack: an access line reports neither.
    line = orjson.dumps(record, default=str).decode()
    access_log.handle(access_log.makeRecord(LOGGER_NAME, logging.INFO, "", 0, line, (), None))
