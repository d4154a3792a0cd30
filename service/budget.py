"""The memory budget of one worker process, and what each request is estimated to need.

Every request that decodes an image or runs a model reserves its estimated peak working memory
*before* the expensive step, from what the image header (or the V2 request's declared shapes)
says. The reservations of one worker add up to at most `NORMSERVE_WORKER_MEMORY_MB`:

- a request whose estimate is larger than the whole budget is refused at once with 413, naming
  the setting (it could never run);
- a request that does not fit now waits for reservations to be released, at most
  `NORMSERVE_MEMORY_WAIT_S`, then gets 503 with `Retry-After`;
- a reservation is released when the request's work has ended (its threads included: a cancelled
  request keeps its reservation until the step it was in returns);
- a request body is reserved as it is read, before its bytes are taken from the socket (from its
  Content-Length, or step by step for a chunked one): bodies not yet counted in an estimate may
  hold at most half the budget (`body_capacity`), so that slow uploads cannot take the memory the
  requests being worked on need; the request's own estimate, which counts its body, then takes
  the body's reservation over (`Held.reserve`).

HTTP requests hold their reservations through `Held` (service/governor.py puts one on every POST);
gRPC's ModelInfer does the same (service/grpc_server.py), from the same worker budget.

The estimates (`decode_bytes`, `tensor_bytes`, `RUN_BYTES_PER_PIXEL`, ...) count the buffers the
pipeline makes, per pixel, and were calibrated by measuring the peak RSS of the real pipeline in
a fresh process per image mode and size (`scripts/calibrate_budget.py`;
tests/service/test_budget.py checks that each estimate bounds the measured peak).
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from normserve.service.errors import Overloaded, PayloadTooLarge

T = TypeVar("T")
MIB = 1024 * 1024
BUDGET_SETTING = "NORMSERVE_WORKER_MEMORY_MB"

# Peak working memory of one ONNX Runtime run, in bytes per pixel of the run (rows x H x W),
# measured (ru_maxrss, one run in a fresh process, graph optimisation as served) and rounded up:
# gncnn 1,154-1,170 B/px at 512² and 1024², 932 at 32 x 32², in_autoencoder 566-569 at 512²,
# 4 x 512² and 1024². Activations grow with the pixels; a task's models share one architecture.
RUN_BYTES_PER_PIXEL = {"classification": 1300, "denoising": 640}
RUN_BYTES_FIXED = 256 * 1024  # per run, whatever its size: ORT's per-run buffers and the outputs' headers


def mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB" if n >= 10 * MIB else f"{n / MIB:,.1f} MiB"


class MemoryBudget:
    """Reservations of one worker's working memory, on its event loop (no locks needed)."""

    def __init__(self, capacity_bytes: int, wait_s: float) -> None:
        self.capacity = capacity_bytes
        self.wait_s = wait_s
        self.used = 0
        self.peak = 0  # the most ever reserved at once (tests and the log read it)
        # request bodies being read, not yet counted in their request's estimate: at most half
        self.body_capacity = capacity_bytes // 2
        self.bodies = 0
        self._waiters: list[asyncio.Future[None]] = []

    def _fits(self, n: int, body: bool = False) -> bool:
        return self.used + n <= self.capacity and (not body or self.bodies + n <= self.body_capacity)

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    async def acquire(self, n: int, what: str, *, body: bool = False) -> None:
        """Reserve `n` bytes for `what` (a phrase naming the request), waiting at most `wait_s`;
        `body`: bytes of a request body about to be read (counted against `body_capacity` too,
        until `take_over_body`)."""
        n = max(0, int(n))
        if n > (self.body_capacity if body else self.capacity):
            raise PayloadTooLarge(
                f"{what} needs an estimated {mib(n)} of working memory; one worker's memory budget is "
                f"{mib(self.capacity)} ({BUDGET_SETTING}"
                + (f", of which request bodies being read may hold {mib(self.body_capacity)}" if body else "")
                + "); send a smaller image or tensor"
            )
        if not self._fits(n, body):
            await self._wait(n, what, body)
        self.used += n
        self.peak = max(self.peak, self.used)
        if body:
            self.bodies += n

    def take_over_body(self, n: int) -> None:
        """`n` reserved body bytes are now part of their request's estimate (still reserved)."""
        self.bodies -= n
        self._wake()

    async def _wait(self, n: int, what: str, body: bool = False) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while not self._fits(n, body):
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                async with asyncio.timeout_at(deadline):
                    await fut
            except TimeoutError:
                raise Overloaded(
                    f"{what} needs an estimated {mib(n)} of working memory and {mib(self.capacity - self.used)} "
                    f"of this worker's {mib(self.capacity)} budget ({BUDGET_SETTING}) stayed free for "
                    f"{self.wait_s:g} s (NORMSERVE_MEMORY_WAIT_S); retry later",
                    retry_after_s=max(1, math.ceil(self.wait_s)),
                ) from None
            finally:
                self._waiters.remove(fut)

    def release(self, n: int, body: int = 0) -> None:
        """Give back `n` bytes, of which `body` were reserved for a body not yet taken over."""
        self.used -= max(0, int(n))
        self.bodies -= body
        self._wake()

    @asynccontextmanager
    async def reserve(self, n: int, what: str) -> AsyncIterator[Reservation]:
        """`async with budget.reserve(n, what) as r:` holds `n` bytes (r.resize() changes it) until
        the block ends."""
        await self.acquire(n, what)
        r = Reservation(self, int(n), what)
        try:
            yield r
        finally:
            self.release(r.bytes)


class Reservation:
    def __init__(self, budget: MemoryBudget, n: int, what: str) -> None:
        self.budget, self.bytes, self.what = budget, n, what

    async def resize(self, n: int) -> None:
        """Change what this reservation holds to `n` bytes: shrinking frees at once, growing
        waits like a new reservation (413 when the total could never fit)."""
        n = int(n)
        if n <= self.bytes:
            self.budget.release(self.bytes - n)
        else:
            await self.budget.acquire(n - self.bytes, self.what)
        self.bytes = n


async def run_gated(gate: asyncio.Semaphore | None, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the thread pool; with `gate`, holding it from before the step starts until
    it returns, even when the caller is cancelled meanwhile (the thread runs on)."""
    if gate is None:
        return await run_in_threadpool(fn, *args)
    await gate.acquire()
    loop = asyncio.get_running_loop()
    lock = threading.Lock()
    state = {"started": False, "released": False}

    def release() -> None:
        with lock:
            if state["released"]:
                return
            state["released"] = True
        loop.call_soon_threadsafe(gate.release)

    def gated(*a: Any) -> T:
        with lock:
            state["started"] = True
        try:
            return fn(*a)
        finally:
            release()

    try:
        return await run_in_threadpool(gated, *args)
    finally:
        with lock:
            never_ran = not state["started"]
        if never_ran:  # cancelled before the thread took the step: nothing will release it
            release()


class DecodeGate:
    """The worker's large decodes, one at a time (NORMSERVE_SERIAL_DECODE_PIXELS): allocating and
    freeing a decoded image of tens of MP holds the GIL for 20-60 ms in Pillow, so several at once
    stall the event loop for their sum; small images never wait."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.semaphore = asyncio.Semaphore(1)

    def for_pixels(self, pixels: int) -> asyncio.Semaphore | None:
        """The semaphore a decode allocating `pixels` pixels goes through, or None (not gated)."""
        return self.semaphore if self.threshold and pixels > self.threshold else None


class Held:
    """What one request holds of its worker's budget: the bytes it reserved (its body's, as it was
    read, among them), and the thread steps it started that have not returned yet. `close()`
    releases everything once those steps have returned: a step the request stopped waiting for
    (deadline, disconnect) still uses its memory."""

    __slots__ = ("body", "budget", "bytes", "steps")

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.bytes = 0
        self.body = 0  # of `bytes`: reserved for the body and not yet taken over by an estimate
        self.steps: list[asyncio.Event] = []

    async def reserve(self, n: int, what: str) -> None:
        """Reserve `n` more bytes for the request (waiting, 503 or 413 as `MemoryBudget.acquire`).
        The estimates count the request's body, so the body's own reservation is taken over first."""
        n = max(0, int(n))
        if self.body:
            taken = min(self.body, n)
            self.body -= taken
            self.budget.take_over_body(taken)
            n -= taken
        if n:
            await self.budget.acquire(n, what)
            self.bytes += n

    async def reserve_body(self, n: int, what: str) -> None:
        """Reserve `n` bytes of request body about to be read."""
        await self.budget.acquire(n, what, body=True)
        self.bytes += n
        self.body += n

    async def in_thread(self, fn: Callable[..., T], *args: Any, gate: asyncio.Semaphore | None = None) -> T:
        """`fn(*args)` in the thread pool; if the request is cancelled meanwhile it stops waiting
        at once, and `close()` keeps the memory reserved until the step has returned. With `gate`
        the step first waits for it (on the loop, cancellable: the wait counts against the
        request's deadline) and holds it until the step has returned, not until the request
        stops waiting for it (`run_gated`)."""
        loop = asyncio.get_running_loop()
        returned = asyncio.Event()
        self.steps.append(returned)

        @functools.wraps(fn)
        def step(*a: Any) -> T:
            try:
                return fn(*a)
            finally:
                loop.call_soon_threadsafe(returned.set)

        try:
            return await run_gated(gate, step, *args)
        finally:
            if returned.is_set():
                self.steps.remove(returned)

    @property
    def busy(self) -> bool:
        """A thread step it started has not returned yet."""
        return any(not e.is_set() for e in self.steps)

    def release(self) -> None:
        """Give back everything reserved (the caller knows no thread step still runs)."""
        self.budget.release(self.bytes, self.body)
        self.bytes = self.body = 0

    async def close(self) -> None:
        """Give back everything reserved, once every thread step has returned."""
        for returned in self.steps:
            await returned.wait()
        self.steps.clear()
        self.release()


# -- estimates ----------------------------------------------------------------------------------
# Bytes per pixel Pillow keeps a decoded image of each mode in (RGB is stored as 4 bytes).
_PILLOW_BPP = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "BGR;15": 2, "BGR;16": 2}
CHUNK_PIXELS = 1 << 19  # pixels converted to RGB at a time (imaging._rgb_array)
# Per pixel of a conversion chunk: the crop, its RGB/RGBA conversions, float64 temporaries of a
# 16-bit or float image, and the numpy view (imaging._chunk_rgb).
_CHUNK_BPP = 48
# per decode: the decoder's state and row buffers, which grow with the file's width (libjpeg:
# measured 1.4 MiB for a 3000-wide JPEG decoded at 1/8 scale)
DECODE_FIXED = 64 * 1024
DECODE_ROW_BYTES = 512  # per pixel of the file's width


def pillow_bytes(mode: str, pixels: int) -> int:
    return _PILLOW_BPP.get(mode, 4) * pixels


def decode_bytes(
    mode: str,
    fmt: str,
    width: int,
    height: int,
    out_pixels: int,
    *,
    progressive_components: int = 0,
    full_pixels: int = 0,
    full_width: int = 0,
    oriented: bool = False,
) -> int:
    """Peak of decoding one image (`width` x `height` after any JPEG draft, in Pillow `mode`) to
    an RGB uint8 array of `out_pixels` pixels (after any reduce): the decoded image, what the
    decoder keeps beside it, the conversion chunk, the output and its reorientation copy."""
    pixels = width * height
    native = pillow_bytes(mode, pixels)
    decoder = 0
    if fmt == "WEBP":  # libwebp's RGBA frame, Pillow's bytes of it and their reading: measured ~18 B/px
        decoder = 20 * pixels
    elif fmt == "TIFF":  # strips/tiles are decoded through a buffer of up to one full plane
        decoder = native
    # A progressive JPEG keeps every DCT coefficient of the full image (2 bytes each, for each
    # component at full resolution: 4:2:0 needs half that) until the last scan, whatever the
    # draft scale: `full_pixels`, the size before the draft.
    decoder += 2 * progressive_components * (full_pixels or pixels)
    chunk = _CHUNK_BPP * min(pixels, CHUNK_PIXELS + width)
    out = 3 * out_pixels * (2 if oriented else 1)
    return DECODE_FIXED + DECODE_ROW_BYTES * max(width, full_width) + native + decoder + chunk + out


def tensor_bytes(pixels: int) -> int:
    """A float32 (1, 3, H, W) model input or output."""
    return 12 * pixels


# numpy's and Pillow's own overheads around the tensor: measured up to 5 % over the buffers at 9 MP
TENSOR_PHASE_MARGIN = 1.1


def run_bytes(task: str, pixels: int) -> int:
    """One model run of `pixels` (rows x H x W)."""
    return RUN_BYTES_PER_PIXEL.get(task, max(RUN_BYTES_PER_PIXEL.values())) * pixels + RUN_BYTES_FIXED


def encode_bytes(pixels: int, as_json: bool = False) -> int:
    """Encoding an RGB uint8 image: Pillow's copy (4 B/px) and the encoded bytes (at most about
    the raw size for PNG level 1 of noise), base64 and JSON on top for a JSON answer."""
    encoded = 3 * pixels + 64 * 1024
    return 4 * pixels + encoded + (2 * encoded if as_json else 0)


# -- V2 infer --------------------------------------------------------------------------------------
JSON_PARSE_BYTES_PER_BYTE = 10  # a JSON tensor of "1," values: a Python int or float per 2-4 bytes


def v2_parse_bytes(body: int, json_part: int) -> int:
    """Reading a V2 request: the body, and the Python objects JSON `data` lists parse into."""
    return body + JSON_PARSE_BYTES_PER_BYTE * json_part


def v2_run_bytes(
    task: str,
    input_bytes: int,
    pixels: int,
    output_values: int,
    binary_output: bool,
) -> int:
    """Running a V2 request: its input arrays (and the isfinite mask and batching copy), the run,
    and its `output_values` float32 outputs with their encoding (binary: the bytes and the joined
    body; JSON: numbers printed as text)."""
    encode = 3 if binary_output else 6
    return 2 * input_bytes + run_bytes(task, pixels) + 4 * output_values * encode
