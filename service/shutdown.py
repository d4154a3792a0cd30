"""Graceful shutdown on SIGTERM (and the first SIGINT): readiness answers 503 and the listening
socket closes at once; requests already received finish, answered with `Connection: close`; idle
keep-alive connections close; then uvicorn's shutdown runs the lifespan, all within
`NORMSERVE_SHUTDOWN_GRACE_S`, and the process exits as uvicorn makes it (143 after SIGTERM).

With several workers each listens on a socket of its own (SO_REUSEPORT, `_supervisor_socket`).
The order of the steps and why (uvicorn discussion #2315): docs/design/shutdown.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.supervisors import multiprocess

log = logging.getLogger("normserve.shutdown")

# The key under which the app's lifespan hands its `Drain` to the server (ASGI lifespan state).
DRAIN_STATE_KEY = "normserve.drain"
# Idle keep-alive connections are closed once no request has been in flight for this long.
DRAIN_SETTLE_S = 0.5
# With several workers: how often a worker checks whether the shared port still takes
# connections, and for how long at most before it closes its connections anyway.
PORT_PROBE_INTERVAL_S = 0.05
PORT_PROBE_MAX_S = 5.0
# Workers listen on sockets of their own, balanced by the kernel (Linux's SO_REUSEPORT; elsewhere
# the option exists without the balancing, and the workers share the supervisor's socket).
REUSE_PORT = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


class Drain:
    """Set once the server has been told to stop; counts the requests the app is handling."""

    def __init__(self) -> None:
        self._draining = threading.Event()
        self._closing = threading.Event()
        self._on_start: list[Callable[[], None]] = []
        self.in_flight = 0
        self.last_activity = time.monotonic()

    def on_start(self, callback: Callable[[], None]) -> None:
        """Call `callback` when draining starts (in the signal handler: it must only schedule
        work, as the gRPC server does to stop taking new calls at once)."""
        self._on_start.append(callback)

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @property
    def closing(self) -> bool:
        """Responses say `Connection: close`."""
        return self._closing.is_set()

    def start(self, *, close_connections: bool = True) -> None:
        """Start draining; with `close_connections=False` keep connections alive until
        `close_connections()` (several workers: see the module's docstring)."""
        first = not self._draining.is_set()
        self._draining.set()
        if close_connections:
            self._closing.set()
        if first:
            for callback in self._on_start:
                callback()

    def close_connections(self) -> None:
        self._closing.set()

    def quiet_for(self) -> float:
        """Seconds since the last request started or finished; 0 while one is in flight."""
        return 0.0 if self.in_flight else time.monotonic() - self.last_activity


class DrainMiddleware:
    """Counts requests in flight; while draining, adds `Connection: close` to every response."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        drain = self.drain

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and drain.closing:
                MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        drain.in_flight += 1
        drain.last_activity = time.monotonic()
        try:
            await self.app(scope, receive, send_closing)
        finally:
            drain.in_flight -= 1
            drain.last_activity = time.monotonic()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain above (readiness off at once, busy connections finish)."""

    def _drain(self) -> Drain | None:
        lifespan = getattr(self, "lifespan", None)
        drain = getattr(lifespan, "state", {}).get(DRAIN_STATE_KEY)
        return drain if isinstance(drain, Drain) else None

    def _stop_listening(self) -> None:
        for server in getattr(self, "servers", []):
            server.close()

    @property
    def _shares_socket(self) -> bool:
        return self.config.workers > 1

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        # Where to check, once draining, that no worker listens any more (TCP only).
        self._probe_addresses = [
            ("::1" if family == socket.AF_INET6 else "127.0.0.1", address[1])
            if address[0] in ("0.0.0.0", "::")
            else address[:2]
            for server in getattr(self, "servers", [])
            for family, address in ((s.family, s.getsockname()) for s in server.sockets)
            if family in (socket.AF_INET, socket.AF_INET6)
        ]

    async def _port_refuses(self) -> bool:
        for host, port in getattr(self, "_probe_addresses", []):
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PORT_PROBE_INTERVAL_S * 4)
            except ConnectionRefusedError:
                continue
            except (OSError, TimeoutError):
                return False  # not known to be closed: a queue that is slow to answer, say
            writer.close()  # a sibling still listens (it sees a connection that says nothing)
            return False
        return True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            drain = self._drain()
            if drain is not None:  # readiness answers 503 from the next request on
                drain.start(close_connections=not self._shares_socket)
            if self.started:
                # Not from inside a signal handler: on the loop, before anything else it runs.
                with contextlib.suppress(RuntimeError):  # no loop running here: shutdown() stops listening
                    asyncio.get_running_loop().call_soon_threadsafe(self._stop_listening)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        self._stop_listening()
        loop = asyncio.get_running_loop()
        started = loop.time()
        grace = self.config.timeout_graceful_shutdown
        deadline = started + (grace if grace is not None else float("inf"))
        drain = self._drain()
        if drain is not None and not drain.closing:
            until = min(deadline, started + PORT_PROBE_MAX_S)
            while not await self._port_refuses() and loop.time() < until and not self.force_exit:
                await asyncio.sleep(PORT_PROBE_INTERVAL_S)
            drain.close_connections()
        connections = self.server_state.connections
        if connections:
            log.info("draining %d connection(s)", len(connections))
        while drain is not None and connections and not self.force_exit and loop.time() < deadline:
            if drain.quiet_for() >= DRAIN_SETTLE_S:
                break  # what is left is idle keep-alive connections; uvicorn closes them
            await asyncio.sleep(0.02)
        if grace is not None:  # uvicorn's wait gets what is left of the grace period
            self.config.timeout_graceful_shutdown = max(0, int(deadline - loop.time()))
        await super().shutdown(sockets)


class _DrainingProcess(multiprocess.Process):
    """A worker process that runs `DrainingServer`, on a listening socket of its own when the
    supervisor's is a SO_REUSEPORT one (see `serve`)."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = DrainingServer(config=self.config)
        return self._server

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # in the worker process
        if sockets and all(_reuses_port(s) for s in sockets):
            own = [_bind_reuse_port(s.family, s.getsockname()) for s in sockets]
            for s in sockets:
                s.close()
            sockets = own
        super().target(sockets)


class DrainingMultiprocess(multiprocess.Multiprocess):
    """uvicorn's worker supervisor, with `DrainingServer` workers and the signal forwarded at once."""

    def __init__(self, config: uvicorn.Config, sockets: list[Any]) -> None:
        super().__init__(config, sockets)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        self.should_exit.set()  # wakes the supervisor loop, which then terminates the workers

    def terminate_all(self) -> None:
        for sock in self.sockets:  # the workers' copies close as each worker starts draining
            sock.close()
        super().terminate_all()

    def run(self) -> None:
        # uvicorn builds workers from the module's `Process` wherever it starts one (start-up,
        # restarts, SIGTTIN); point it at ours while this supervisor runs.
        original = multiprocess.Process
        setattr(multiprocess, "Process", _DrainingProcess)  # noqa: B010
        try:
            super().run()
        finally:
            setattr(multiprocess, "Process", original)  # noqa: B010


def _reuses_port(sock: socket.socket) -> bool:
    return REUSE_PORT and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


def _bind_reuse_port(family: int, address: Any) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def _supervisor_socket(config: uvicorn.Config) -> socket.socket:
    """The socket the supervisor holds for its workers. On Linux, for TCP, one bound with
    SO_REUSEPORT that never listens: it keeps the port, and each worker binds and listens on a
    socket of its own next to it, so the kernel spreads connections evenly over the workers (by
    a hash of the client's address and port). On one shared listening socket a connection goes
    to whichever worker accepts first, and a burst of new connections can all land on one of
    them (measured: all 32 of wrk's connections on one of two workers in 1 start out of 6, at
    57 % of the throughput of an even spread)."""
    if not REUSE_PORT or config.uds is not None or config.fd is not None:
        return config.bind_socket()
    family = socket.AF_INET6 if config.host and ":" in config.host else socket.AF_INET
    try:
        sock = _bind_reuse_port(family, (config.host, config.port))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        sys.exit(3)  # uvicorn's STARTUP_FAILURE, as its own bind_socket does
    host = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    logging.getLogger("uvicorn.error").info(
        "Uvicorn running on http://%s:%d with %d workers, one listening socket each (SO_REUSEPORT)",
        host,
        sock.getsockname()[1],
        config.workers,
    )
    sock.set_inheritable(True)
    return sock


def serve(config: uvicorn.Config) -> int:
    """Run the server (one process, or a supervisor and `config.workers` workers) until stopped."""
    if config.workers > 1:
        sock = _supervisor_socket(config)
        try:
            DrainingMultiprocess(config, sockets=[sock]).run()
        finally:
            sock.close()
        return 0
    server = DrainingServer(config)
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT, re-raised after the clean shutdown
        server.run()
    return 0 if server.started else 3  # uvicorn's STARTUP_FAILURE
