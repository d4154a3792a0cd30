"""Per-request governance of the POST routes: one deadline for the whole request, cancellation
when the client disconnects, and the request's memory reservation released when it is over.

- **Deadline.** `NORMSERVE_REQUEST_TIMEOUT_S` counts from the request's arrival and covers
  everything: reading the body, decoding, waiting for memory, the batcher's queue, the run, the
  tiles, the encoding. When it passes, the request's task is cancelled: work not yet started
  (queued requests, tiles not yet run, the encode) never starts, a model run in progress is
  told to stop (service/batching.py), and the client gets 504. A step already running in a
  thread (one decode, one tile batch, one encode) cannot be interrupted; the answer comes when
  it returns.
- **Disconnect.** A request still running 50 ms after its body was read gets a watcher that
  waits for the client to go away (uvicorn's `http.disconnect`); when it does, the request's
  task is cancelled the same way and nothing more is computed for it (logged as 499, nginx's
  "client closed request"). Short requests never start the watcher.
- **Memory.** Routes reserve from the worker's `MemoryBudget` through `reserve()`; everything a
  request reserved is released here, once the response is sent and every step it started has
  returned, so the budget never counts memory as free while a thread still uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from normserve.service.budget import MemoryBudget

HELD_KEY = "normserve.reserved"  # scope key: [bytes reserved by this request]
THREADS_KEY = "normserve.threads"  # scope key: events set when each thread step of the request returns
T = TypeVar("T")
DEADLINE_KEY = "normserve.deadline"  # scope key: the loop time the request must be answered by
# The governor cancels this long after the deadline, so that a step which watches the same
# deadline itself (the batcher's queue and run) answers first, with its more precise message.
GRACE_S = 0.1
WATCH_AFTER_S = 0.05  # requests that take longer than this get a disconnect watcher


async def reserve(request: Request, n: int, what: str) -> None:
    """Reserve `n` more bytes of the worker's memory budget for this request (waiting, 503 or
    413 as `MemoryBudget.acquire`), released by `RequestGovernor` when the request is over."""
    budget: MemoryBudget = request.app.state.budget
    await budget.acquire(n, what)
    held = request.scope.get(HELD_KEY)
    if held is None:  # not behind the governor (a unit test mounting a route alone): release now-ish
        budget.release(n)
        return
    held[0] += n


async def in_thread(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the thread pool, for a request: when the request is cancelled meanwhile
    (deadline, disconnect) it stops waiting at once, but the step runs on, and the governor keeps
    the request's memory reserved until it has returned."""
    steps: list[asyncio.Event] | None = request.scope.get(THREADS_KEY)
    if steps is None:
        return await run_in_threadpool(fn, *args)
    loop = asyncio.get_running_loop()
    returned = asyncio.Event()
    steps.append(returned)

    @functools.wraps(fn)
    def step(*a: Any) -> T:
        try:
            return fn(*a)
        finally:
            loop.call_soon_threadsafe(returned.set)

    try:
        return await run_in_threadpool(step, *args)
    finally:
        if returned.is_set():
            steps.remove(returned)


class RequestGovernor:
    def __init__(self, app: ASGIApp, budget: MemoryBudget, timeout_s: float) -> None:
        self.app = app
        self.budget = budget
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        held = scope[HELD_KEY] = [0]
        steps: list[asyncio.Event] = []
        scope[THREADS_KEY] = steps
        why: list[str] = []  # set by the timer or the watcher that cancelled the task
        started = False
        body_done = False
        watcher: asyncio.Task[None] | None = None
        disconnected: asyncio.Future[Message] = loop.create_future()

        def stop(reason: str) -> None:
            if not why:
                why.append(reason)
                task.cancel()

        async def watch() -> None:
            message = await receive()
            if not disconnected.done():
                disconnected.set_result(message)
            if message["type"] == "http.disconnect":
                stop("disconnect")

        def start_watcher() -> None:
            nonlocal watcher
            if body_done and watcher is None and not why:
                watcher = loop.create_task(watch())

        async def governed_receive() -> Message:
            nonlocal body_done
            if body_done:  # after the body only a disconnect can come: the watcher's, if it runs
                start_watcher()
                return await asyncio.shield(disconnected)
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_done = True
                if loop.time() >= watch_at:
                    start_watcher()
            elif message["type"] == "http.disconnect":
                body_done = True
                if not disconnected.done():
                    disconnected.set_result(message)
            return message

        async def governed_send(message: Message) -> None:
            nonlocal started
            if why:  # the request was given up; its own answer (if any) is not sent
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        watch_at = loop.time() + WATCH_AFTER_S
        deadline = scope[DEADLINE_KEY] = loop.time() + self.timeout_s
        timers = [
            loop.call_at(watch_at, start_watcher),
            loop.call_at(deadline + GRACE_S, stop, "timeout"),
        ]
        try:
            try:
                await self.app(scope, governed_receive, governed_send)
            except asyncio.CancelledError:
                if not why or task.uncancel() > 0:  # cancelled from outside (shutdown): not ours to answer
                    raise
            if why and not started:
                if why[0] == "timeout":
                    await _answer(
                        send,
                        504,
                        f"the request did not finish within {self.timeout_s:g} s (NORMSERVE_REQUEST_TIMEOUT_S); "
                        "work not yet started was dropped",
                    )
                else:  # nobody is listening; the access log and metrics record nginx's 499
                    await _answer(send, 499, "client closed the request; its work was dropped")
        finally:
            for timer in timers:
                timer.cancel()
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            for returned in steps:  # a step the request stopped waiting for still uses its memory
                await returned.wait()
            self.budget.release(held[0])
            held[0] = 0


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
