"""The request governor's disconnect handling (service/governor.py), both ways it learns of one:

- served by `normserve serve`'s HTTP protocol (service/http_limits.py), which puts a
  `DisconnectHook` in each request's scope and calls it from `connection_lost`: tested with a real
  uvicorn server on loopback, a real socket closed mid-request;
- under any other ASGI server, a watcher that reads `http.disconnect` from `receive()` once the
  request has run for `WATCH_AFTER_S`.

Either way the request's task is cancelled (its work dropped) and the answer is nginx's 499.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
import uvicorn
from starlette.types import Message, Receive, Scope, Send

from normserve.service.budget import MemoryBudget
from normserve.service.governor import DISCONNECT_HOOK_KEY, DisconnectHook, RequestGovernor
from normserve.service.http_limits import LimitedHttpToolsProtocol


class SlowApp:
    """Reads the body, then works for `work_s` unless cancelled; records what happened."""

    def __init__(self, work_s: float = 30.0) -> None:
        self.work_s = work_s
        self.body_read = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.receives_after_body = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        self.body_read.set()
        try:
            await asyncio.sleep(self.work_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


class CountingReceive:
    """The server's receive(), counting the calls made after the body was read."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.after_body = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_done = False

        async def counted() -> Message:
            nonlocal body_done
            if body_done:
                self.after_body += 1
            message = await receive()
            body_done = body_done or (message["type"] == "http.request" and not message.get("more_body", False))
            return message

        await self.app(scope, counted, send)


@pytest.mark.parametrize("body_bytes", [5, 4 * 1024 * 1024], ids=["small", "past-high-water"])
def test_the_protocol_reports_a_disconnect_and_the_request_is_dropped_without_a_watcher(body_bytes: int) -> None:
    """A real uvicorn server with normserve's protocol: the client closes its socket while the
    request works; the request's task is cancelled at once, and the governor never read
    `receive()` after the body (no watcher task); the answer (for the log) is 499. A body past
    uvicorn's 64 KiB high-water mark had reading paused while it waited for the app: the
    protocol reads on once the body is complete, or it would not see the client go."""

    async def scenario() -> None:
        slow = SlowApp()
        counting = CountingReceive(slow)
        statuses: list[int] = []
        governor = RequestGovernor(counting, budget=MemoryBudget(1 << 30, 1.0), timeout_s=30.0)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                return
            assert isinstance(scope.get(DISCONNECT_HOOK_KEY), DisconnectHook)

            async def recording(message: Message) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])
                await send(message)

            await governor(scope, receive, recording)

        config = uvicorn.Config(app, host="127.0.0.1", port=0, http=LimitedHttpToolsProtocol, lifespan="off")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                await asyncio.sleep(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]  # bound to port 0: the one it got
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % body_bytes
            first = body_bytes // 8
            writer.write(head + b"x" * first)  # the app now waits in receive() for the rest ...
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(b"x" * (body_bytes - first))  # ... which comes in reads past the high-water mark
            await writer.drain()
            await asyncio.wait_for(slow.body_read.wait(), 5)
            writer.close()
            await asyncio.wait_for(slow.cancelled.wait(), 5)
            for _ in range(100):  # the governor answers 499 once the cancelled task has unwound
                if statuses:
                    break
                await asyncio.sleep(0.01)
            assert statuses == [499]
            assert counting.after_body == 0, "a watcher read receive(): the protocol's hook was not used"
        finally:
            server.should_exit = True
            await serving

    asyncio.run(scenario())


@pytest.mark.parametrize("hooked", [True, False], ids=["hook", "watcher"])
def test_a_disconnect_cancels_the_request_either_way(hooked: bool) -> None:
    """ASGI-level: with a hook in the scope, calling it cancels the request; without one, the
    watcher reads `http.disconnect` from receive() after WATCH_AFTER_S and does the same."""

    async def scenario() -> None:
        slow = SlowApp()
        governor = RequestGovernor(slow, budget=MemoryBudget(1 << 30, 1.0), timeout_s=30.0)
        hook = DisconnectHook()
        scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/work", "headers": []}
        if hooked:
            scope[DISCONNECT_HOOK_KEY] = hook
        gone = asyncio.Event()
        messages = [{"type": "http.request", "body": b"", "more_body": False}]
        sent: list[Message] = []

        async def receive() -> Message:
            if messages:
                return messages.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        task = asyncio.create_task(governor(scope, receive, send))  # type: ignore[arg-type]
        await asyncio.wait_for(slow.body_read.wait(), 5)
        assert (hook.callback is not None) == hooked
        gone.set()
        if hooked:
            assert hook.callback is not None
            hook.callback()  # what the protocol's connection_lost does
        await asyncio.wait_for(task, 5)
        assert slow.cancelled.is_set()
        assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]

    asyncio.run(scenario())


def test_a_finished_request_leaves_no_reference_cycle() -> None:
    """Once a request is over, its hook no longer points at its governor: the hook lives in the
    scope, and the server's receive() belongs to an object that holds the scope (uvicorn's
    request cycle), so a callback left set would make a cycle of some 40 objects per request
    for the garbage collector."""
    from normserve.service.governor import _Governed

    async def scenario() -> None:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        governor = RequestGovernor(app, budget=MemoryBudget(1 << 30, 1.0), timeout_s=30.0)
        scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/", "headers": []}
        scope[DISCONNECT_HOOK_KEY] = DisconnectHook()

        async def receive() -> Message:  # refers to the scope, as uvicorn's cycle does
            return {"type": "http.request", "body": b"", "more_body": False, "for": scope["path"]}

        async def send(message: Message) -> None:
            pass

        await governor(scope, receive, send)  # type: ignore[arg-type]
        assert scope[DISCONNECT_HOOK_KEY].callback is None

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        asyncio.run(scenario())
        gc.collect()
        assert not [o for o in gc.garbage if isinstance(o, _Governed)], "a governed request was left in a cycle"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
