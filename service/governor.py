"""Per-request governance of the POST routes: one deadline for the whole request, cancellation
when the client disconnects, and the request's memory reservation released when it is over.

- **Deadline.** `NORMSERVE_REQUEST_TIMEOUT_S` counts from the request's arrival and covers
  everything: reading the body, decoding, waiting for memory, the batcher's queue, the run, the
  tiles, the encoding. When it passes, the request's task is cancelled: work not yet started
  (queued requests, tiles not yet run, the encode) never starts, a model run in progress is
  told to stop (service/batching.py), and the client gets 504. A step already running in a
  thread (one decode, one tile batch, one encode) cannot be interrupted; the answer comes when
  it returns.
- **Disconnect.** When the client goes away, the request's task is cancelled the same way and
  nothing more is computed for it (logged as 499, nginx's "client closed request"). Under
  `normserve serve` the HTTP protocol itself says so (service/http_limits.py calls the request's
  `DisconnectHook` from `connection_lost`): no task or timer per request. Under any other ASGI
  server a request still running 50 ms after its body was read gets a watcher task that waits
  for uvicorn's `http.disconnect`; short requests never start it.
- **Memory.** Routes reserve from the worker's `MemoryBudget` through `reserve()`; everything a
  request reserved is released here, once the response is sent and every step it started has
  returned, so the budget never counts memory as free while a thread still uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from normserve.service.budget import Held, MemoryBudget, run_gated
from normserve.service.state import request_state

DISCONNECT_HOOK_KEY = "normserve.disconnect"  # scope key: a DisconnectHook, set by the HTTP protocol

HELD_KEY = "normserve.held"  # scope key: the request's `Held` (its reservation and thread steps)
# scope key: the body's declared length as the body-size limit (middleware.py) read it from the
# headers (None: chunked), so the governor does not read them again
BODY_LENGTH_KEY = "normserve.body_length"
DEADLINE_KEY = "normserve.deadline"  # scope key: the loop time the request must be answered by
T = TypeVar("T")
# The governor cancels this long after the deadline, so that a step which watches the same
# deadline itself (the batcher's queue and run) answers first, with its more precise message.
GRACE_S = 0.1
WATCH_AFTER_S = 0.05  # without a DisconnectHook, requests that take longer get a disconnect watcher
# A body up to this size is not reserved: uvicorn buffers this much of any body (its flow
# control's high-water mark) before the app reads it, whatever the budget says.
BODY_UNRESERVED = 64 * 1024
BODY_STEP = 1024 * 1024  # a body without Content-Length (chunked) is reserved this much at a time


class DisconnectHook:
    """Put in a request's scope by a server protocol that calls `callback` (when set) as soon as
    the connection is lost before the response is complete (service/http_limits.py)."""

    __slots__ = ("callback",)

    def __init__(self) -> None:
        self.callback: Callable[[], None] | None = None


async def reserve(request: Request, n: int, what: str) -> None:
    """Reserve `n` more bytes of the worker's memory budget for this request (waiting, 503 or
    413 as `MemoryBudget.acquire`), released by `RequestGovernor` when the request is over."""
    held: Held | None = request.scope.get(HELD_KEY)
    if held is None:  # not behind the governor (a unit test mounting a route alone): release now-ish
        budget: MemoryBudget = request_state(request).budget
        await budget.acquire(n, what)
        budget.release(n)
        return
    await held.reserve(n, what)


async def in_thread(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the thread pool, for a request: when the request is cancelled meanwhile
    (deadline, disconnect) it stops waiting at once, but the step runs on, and the governor keeps
    the request's memory reserved until it has returned."""
    held: Held | None = request.scope.get(HELD_KEY)
    if held is None:
        return await run_in_threadpool(fn, *args)
    return await held.in_thread(fn, *args)


async def decode_in_thread(request: Request, pixels: int, fn: Callable[..., T], *args: Any) -> T:
    """`in_thread` for a decode whose Pillow image has `pixels` pixels: above
    NORMSERVE_SERIAL_DECODE_PIXELS it first waits for the worker's one large-decode slot
    (`DecodeGate`), within the request's deadline."""
    gate = request_state(request).decode_gate.for_pixels(pixels)
    held: Held | None = request.scope.get(HELD_KEY)
    if held is None:
        return await run_gated(gate, fn, *args)
    return await held.in_thread(fn, *args, gate=gate)


def held(request: Request) -> Held | None:
    """What the request holds of the worker's budget (None outside the governor)."""
    h: Held | None = request.scope.get(HELD_KEY)
    return h


def _declared_length(scope: Scope) -> int | None:
    """The body's Content-Length; None for a chunked body (length unknown); 0 without either."""
    chunked = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
        chunked = chunked or name == b"transfer-encoding"
    return None if chunked else 0


class RequestGovernor:
    def __init__(self, app: ASGIApp, budget: MemoryBudget, timeout_s: float) -> None:
        self.app = app
        self.budget = budget
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = _Governed(self, scope, receive, send)
        try:
            try:
                await self.app(scope, request.receive, request.send)
            except asyncio.CancelledError:
                if not request.why or request.task.uncancel() > 0:  # cancelled from outside (shutdown)
                    raise
            if request.why and not request.started:
                if request.why == "timeout":
                    await _answer(
                        send,
                        504,
                        f"the request did not finish within {self.timeout_s:g} s (NORMSERVE_REQUEST_TIMEOUT_S); "
                        "work not yet started was dropped",
                    )
                else:  # nobody is listening; the access log and metrics record nginx's 499
                    await _answer(send, 499, "client closed the request; its work was dropped")
        finally:
            request.unhook()
            if not request.close_now():  # a watcher or a thread step still to wait for
                await request.close()


class _Governed:
    """One governed request: its timer, its disconnect watcher, its reservation and thread steps.
    With a DisconnectHook (the protocol reports the disconnect), one timer at the deadline and no
    watcher. Without, one timer at a time: first at WATCH_AFTER_S (most requests are over by then
    and never get more), then at the deadline."""

    __slots__ = (
        "_ahead",
        "_body_left",
        "_body_refused",
        "_disconnected",
        "_hook",
        "_receive",
        "_send",
        "_timer",
        "_watcher",
        "body_done",
        "deadline",
        "governor",
        "held",
        "loop",
        "started",
        "task",
        "why",
    )

    def __init__(self, governor: RequestGovernor, scope: Scope, receive: Receive, send: Send) -> None:
        self.governor = governor
        self._receive, self._send = receive, send
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.held = scope[HELD_KEY] = Held(governor.budget)
        # body bytes still to reserve before reading: from Content-Length (-1: chunked, in steps)
        declared = scope[BODY_LENGTH_KEY] if BODY_LENGTH_KEY in scope else _declared_length(scope)
        self._body_left = -1 if declared is None else declared if declared > BODY_UNRESERVED else 0
        self._ahead = 0  # chunked: bytes reserved and not read yet
        self._body_refused = False  # its body got no reservation (503/413) before it was read
        self.why = ""  # "timeout" or "disconnect" once the request was given up
        self.started = self.body_done = False
        self._watcher: asyncio.Task[None] | None = None
        self._disconnected: asyncio.Future[Message] | None = None
        now = self.loop.time()
        self.deadline = scope[DEADLINE_KEY] = now + governor.timeout_s
        hook: DisconnectHook | None = scope.get(DISCONNECT_HOOK_KEY)
        self._hook = hook
        if hook is not None:  # the protocol reports the disconnect: no watcher, one timer
            hook.callback = self._on_disconnect
            self._timer = self.loop.call_at(self.deadline + GRACE_S, self._tick)
        else:
            self._timer = self.loop.call_at(min(now + WATCH_AFTER_S, self.deadline + GRACE_S), self._tick)

    def _tick(self) -> None:
        if self.loop.time() >= self.deadline + GRACE_S:
            self._stop("timeout")
            return
        self._start_watcher()
        self._timer = self.loop.call_at(self.deadline + GRACE_S, self._tick)

    def _on_disconnect(self) -> None:
        self._stop("disconnect")

    def _stop(self, reason: str) -> None:
        if not self.why:
            self.why = reason
            self.task.cancel()

    def _future(self) -> asyncio.Future[Message]:
        if self._disconnected is None:
            self._disconnected = self.loop.create_future()
        return self._disconnected

    def _start_watcher(self) -> None:
        if self.body_done and self._watcher is None and not self.why and self._hook is None:
            self._watcher = self.loop.create_task(self._watch())

    async def _watch(self) -> None:
        message = await self._receive()
        future = self._future()
        if not future.done():
            future.set_result(message)
        if message["type"] == "http.disconnect":
            self._stop("disconnect")

    async def receive(self) -> Message:
        if self.body_done:  # after the body only a disconnect can come: the watcher's, if it runs
            if self._hook is not None:  # no watcher shares the server's receive(): wait on it directly
                return await self._receive()
            self._start_watcher()
            return await asyncio.shield(self._future())
        if self._body_left:
            try:
                await self._reserve_body()
            except Exception:  # 503 (no room in time) or 413 (larger than the budget)
                self._body_refused = True
                raise
        message = await self._receive()
        if self._body_left < 0 and message["type"] == "http.request":
            self._ahead -= len(message.get("body", b""))
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.body_done = True
            if self._watcher is None and self.loop.time() >= self.deadline - self.governor.timeout_s + WATCH_AFTER_S:
                self._start_watcher()  # the body took longer than the watch delay
        elif message["type"] == "http.disconnect":
            self.body_done = True
            future = self._future()
            if not future.done():
                future.set_result(message)
        return message

    async def _reserve_body(self) -> None:
        """Reserve the body before uvicorn reads it from the socket (it reads at most its 64 KiB
        high-water mark ahead of the app): all of a declared length at once, a chunked body a
        step ahead of what was read."""
        if self._body_left > 0:
            n, self._body_left = self._body_left, 0
            await self.held.reserve_body(n, f"a request body of {n} bytes")
        elif self._ahead < BODY_STEP // 2:
            await self.held.reserve_body(BODY_STEP, "a chunked request body")
            self._ahead += BODY_STEP

    async def send(self, message: Message) -> None:
        if self.why:  # the request was given up; its own answer (if any) is not sent
            return
        if message["type"] == "http.response.start":
            self.started = True
            if self._body_refused and not self.body_done:
                # The body was refused before it was read: the answer closes the connection
                # (uvicorn closes it once the answer is written) instead of reading and throwing
                # away the rest of the body (up to NORMSERVE_MAX_DISCARD_BYTES) on the event loop.
                # A client still sending gets a reset on its send; httpx and curl then read the
                # answer, which arrived before the reset.
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await self._send(message)

    def unhook(self) -> None:
        """The request is over: the protocol has nothing more to tell it. (The hook's callback
        would otherwise keep a reference cycle alive, scope -> hook -> this -> the server's
        receive -> its cycle -> scope, for the garbage collector to find: about 40 objects a
        request, measured, and the collections they cost.)"""
        if self._hook is not None:
            self._hook.callback = None
            self._hook = None

    def close_now(self) -> bool:
        """Stop the timer; with no watcher and no thread step left, release the reservation now
        and say so (most requests: `close` need not be awaited)."""
        self._timer.cancel()
        held = self.held
        if self._watcher is not None or (held.steps and held.busy):
            return False
        held.release()
        return True

    async def close(self) -> None:
        """Stop the timer and the watcher; once every thread step has returned (a step the
        request stopped waiting for still uses its memory), release the reservation."""
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.held.close()


async def _answer(send: Send, status: int, message: str) -> None:
    body = orjson.dumps({"error": message})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def request_deadline(request: Request) -> float | None:
    """The loop time by which the request must be answered (None outside the governor)."""
    deadline: float | None = request.scope.get(DEADLINE_KEY)
    return deadline
