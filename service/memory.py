"""Memory returned to the system after a burst, once a worker goes quiet.

After a burst of large requests a worker's RSS stayed near its peak (issue #26: 1.2-6.7 GB idle).
Measured (docs/limits-http.md, "Memory returned"; scripts/idle_rss.py), almost all of it is
ONNX Runtime's CPU memory arena: each session keeps the largest activations any run needed, for
the life of the process. glibc's own free lists (what `malloc_trim` or `MALLOC_ARENA_MAX` act
on) were a small part: neither changed idle RSS measurably without the arena shrink.

So, once the worker has had no request in flight for `NORMSERVE_MEMORY_TRIM_IDLE_S` after some
activity (never during a burst, at most once per quiet spell), `MemoryTrimmer`, in a thread:
1. shrinks every loaded session's arena (`ServedModel.shrink_arena`: one run on the smallest
   input with ORT's `memory.enable_memory_arena_shrinkage` run option);
2. collects Python's garbage (cycles that hold arrays);
3. calls glibc's `malloc_trim(0)`, which hands the free pages of every malloc arena back to the
   kernel (elsewhere than glibc, e.g. musl or macOS, there is none and this step is skipped).
The next large run grows the arena again, as the first one after start-up did. With glibc's
malloc arenas capped at `NORMSERVE_MALLOC_ARENAS` (2; `limit_malloc_arenas`, set as the worker
starts) idle RSS 60 s after the burst measured 1.25-1.28x start-up, against 1.28-1.39x with
glibc's default of 8 per core (two runs; 7.3x before any of this).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable, Iterable

from normserve.service.model import ServedModel
from normserve.service.repository import ModelRepository
from normserve.service.shutdown import Drain

log = logging.getLogger("normserve.memory")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim  # type: ignore[no-any-return]


MALLOC_TRIM = _malloc_trim()
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h), what MALLOC_ARENA_MAX sets from the environment
M_MMAP_THRESHOLD = -3  # ... and what MALLOC_MMAP_THRESHOLD_ sets
# Allocations at least this large get pages of their own (mmap) and give them back when freed.
# glibc's default threshold starts at 128 KiB and rises to the size of any mmapped block freed
# (up to 32 MiB): after the first large image, Pillow's 16 MiB image blocks, decoded planes and
# request bodies came from the heap, and what a request freed between its phases (the decode's
# image before /reconstruct's tiles, say) stayed resident beside what the next phase allocated
# elsewhere (ORT's arena): the estimates take the phases' maximum, RSS grew toward their sum.
# A fixed threshold (which also stops the rise) keeps small allocations on the heap.
MMAP_THRESHOLD = 4 * 1024 * 1024


def limit_malloc_arenas(arenas: int, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Cap glibc's malloc arenas for this process from now on (`mallopt(M_ARENA_MAX)`, as
    `MALLOC_ARENA_MAX` does at start); 0 leaves glibc's default (8 x cores). Call it before the
    threads start: each thread that allocates gets an arena of its own up to the cap, and an
    arena keeps pages that the trim cannot give back while chunks in it are live. Also fixes the
    mmap threshold at `mmap_threshold` (0: glibc's sliding default). True if the cap was set."""
    if MALLOC_TRIM is None:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mmap_threshold > 0:
        mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    return arenas > 0 and bool(mallopt(M_ARENA_MAX, arenas))


def trim_memory(models: Iterable[ServedModel] = ()) -> bool:
    """Shrink each model's ORT arena, free Python's garbage, then give glibc's free pages back to
    the kernel; True if glibc released some."""
    for model in models:
        try:
            model.shrink_arena()
        except Exception as exc:  # a model stopped or swapped meanwhile: nothing to give back
            log.debug("%s: arena not shrunk: %s", model.key, exc)
    gc.collect()
    return MALLOC_TRIM is not None and MALLOC_TRIM(0) == 1


class MemoryTrimmer:
    """Trims once the worker has been quiet (no request in flight) for `idle_s` after activity."""

    def __init__(self, drain: Drain, idle_s: float, repository: ModelRepository | None = None) -> None:
        self.drain = drain
        self.repository = repository
        self.idle_s = idle_s
        self.trimmed_at = time.monotonic()
        self.trims = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.idle_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="memory-trim")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.idle_s / 2)
            if self.drain.last_activity > self.trimmed_at and self.drain.quiet_for() >= self.idle_s:
                started = time.monotonic()
                models = self.repository.all() if self.repository is not None else []
                await asyncio.to_thread(trim_memory, models)
                self.trimmed_at, self.trims = time.monotonic(), self.trims + 1
                log.debug("trimmed the heap in %.1f ms", (self.trimmed_at - started) * 1000)
