"""Dynamic batching, one batcher per served model version (after Triton's dynamic batcher); each
started version (service/model.py) owns its batcher and its `BatchPolicy`, resolved at load.

Requests queue per model; the oldest one and every queued request with the same input shapes and
dtypes run as one ORT call, up to `max_batch_size` rows and `max_batch_pixels`, and each caller gets
exactly its own rows. Up to `instances` batches of a model run at once, each on its own inference
thread. A request with more rows than `max_batch_size` gets 400, a full queue 503, a request past
`request_timeout_s` 504; a failing run fails only its own callers. The rules and the reasons:
docs/design/batching.md.

With tracing on (service/tracing.py), each request's `queue` span runs from its arrival to its
batch's start, and each batch has one `run` span, linked to every request it served.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from normserve.contract import DynamicBatching, ModelConfigFile
from normserve.service.errors import (
    InferenceError,
    InvalidInput,
    ModelNotReady,
    NormserveError,
    Overloaded,
    RequestTimeout,
)
from normserve.service.metrics import Metrics
from normserve.service.settings import Settings
from normserve.service.tracing import NO_SPAN, QueueMark, Tracing

if TYPE_CHECKING:
    from normserve.service.model import ServedModel

log = logging.getLogger("normserve.batching")

RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait
# Which runs keep their session's ONNX Runtime arena for the next run, in pixels (rows x H x W):
# runs of at most KEEP_ARENA_PIXELS joined from requests of at most KEEP_ARENA_REQUEST_PIXELS each
# (single 512² images, or two in one run: /reconstruct 512² at c=4). Any other run gives its
# activations back when it ends: a tile batch of one large image (kept, what an arena holds after
# its requests have ended is outside the budget's reservations, in each of a worker's two
# sessions: the attack suite's 24 MP /reconstruct peaked at 2.2 GB over start-up, not 0.8 GB), a
# large V2 request. What runs keep, the idle trim gives back once the worker is quiet (service/memory.py).
# Giving back after every run made the next one fault its activations in again: a batch of two
# 512² images did, with 2.3-2.6x the page faults and +10-20 ms of system CPU per request,
# /reconstruct 512² c=4 at 0.93 of its throughput (docs/limits-budgets.md).
KEEP_ARENA_PIXELS = 2 * 512 * 512
KEEP_ARENA_REQUEST_PIXELS = 512 * 512

# (input name, shape without the batch dim, dtype) per input: requests with equal keys share runs.
BatchKey = tuple[tuple[str, tuple[int, ...], str], ...]


@dataclass(frozen=True)
class BatchPolicy:
    """The batching limits of one model: the settings, overridden by its config.json."""

    max_batch_size: int  # 0: the model cannot be batched (fixed first dimension); requests run alone
    max_queue_delay_ms: float
    max_queue_size: int
    max_batch_pixels: int
    timeout_s: float
    instances: int = 1  # batches of this model that run at the same time

    @classmethod
    def resolve(cls, settings: Settings, config: ModelConfigFile) -> BatchPolicy:
        own = config.dynamic_batching or DynamicBatching()
        batchable = all(t.shape and t.shape[0] == -1 for t in [*config.inputs, *config.outputs])
        max_batch_size = settings.max_batch_size if own.max_batch_size is None else own.max_batch_size
        return cls(
            max_batch_size=max_batch_size if batchable else 0,
            max_queue_delay_ms=settings.max_queue_delay_ms
            if own.max_queue_delay_ms is None
            else own.max_queue_delay_ms,
            max_queue_size=settings.max_queue_size if own.max_queue_size is None else own.max_queue_size,
            max_batch_pixels=settings.max_batch_pixels or _largest_single_image(settings, config),
            timeout_s=settings.request_timeout_s,
            instances=settings.instances(),
        )


def _largest_single_image(settings: Settings, config: ModelConfigFile) -> int:
    """Pixels of the largest single model run an image route makes: a joined batch is capped at
    this, so batching never needs more memory than one request may already take. /reconstruct
    runs images larger than a tile as batches of tiles, so its largest run is one tile batch."""
    if config.task == "denoising":
        return min(settings.max_reconstruct_pixels, settings.reconstruct_tile**2 * settings.reconstruct_tile_batch)
    return settings.max_features_pixels


@dataclass(frozen=True)
class BatchResult:
    outputs: dict[str, np.ndarray]  # this caller's rows of the outputs it asked for
    batch_rows: int  # rows in the run it was part of


@dataclass(eq=False)
class _Pending:
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None  # None = every output
    rows: int
    pixels: int
    key: BatchKey
    enqueued: float
    future: asyncio.Future[BatchResult]
    # Set on the event loop when the caller gives up; the inference thread skips such requests.
    abandoned: bool = False
    queued: bool = True  # in the batcher's queue (False once taken into a batch or abandoned)
    running: bool = field(default=False)  # set by the inference thread when its run starts
    batch: list[_Pending] | None = None  # the batch it was taken into
    run_options: ort.RunOptions | None = None  # its batch's run: terminated when every caller gave up
    mark: QueueMark | None = None  # with tracing on: the request's trace context and arrival


def _rows_and_key(inputs: dict[str, np.ndarray]) -> tuple[int, int, BatchKey]:
    """Rows (the batch dim), pixels (rows x H x W of the first input) and the batching key."""
    if not inputs:
        raise InvalidInput("the request has no inputs")
    shapes = {name: a.shape for name, a in inputs.items()}
    if any(len(s) == 0 for s in shapes.values()):
        raise InvalidInput(f"every input needs a batch dimension; got shapes {shapes}")
    rows = {s[0] for s in shapes.values()}
    if len(rows) != 1:
        raise InvalidInput(f"inputs disagree on the batch size (first dimension): {shapes}")
    n = rows.pop()
    pixels = run_pixels(inputs)
    key = tuple(sorted((name, a.shape[1:], a.dtype.str) for name, a in inputs.items()))
    return n, pixels, key


class ModelBatcher:
    """Queues one model version's requests and runs them in batches on the inference executor."""

    def __init__(
        self,
        model: ServedModel,
        executor: Executor,
        metrics: Metrics,
        policy: BatchPolicy,
        tracing: Tracing | None = None,
    ) -> None:
        self.model = model
        self.policy = policy
        self._executor = executor
        # this version's labelled series, looked up once (`labels()` takes a lock on every call)
        self._depth = metrics.queue_depth.labels(model.name)
        self._queue_seconds = metrics.queue_seconds.labels(model.name)
        self._compute_seconds = metrics.compute_seconds.labels(model.name, model.version)
        self._batch_size = metrics.batch_size.labels(model.name)
        self._tracing = tracing
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._dispatched = 0
        self._task: asyncio.Task[None] | None = None
        self._free = asyncio.Semaphore(policy.instances)  # instances not running a batch
        self._running: set[asyncio.Task[None]] = set()

    @property
    def queued(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return len(self._queue)

    @property
    def dispatched(self) -> int:
        """Requests taken into batches (waiting for an inference thread or running)."""
        return self._dispatched

    @property
    def closing(self) -> bool:
        return self._closing

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"batcher {self.model.key}")

    async def stop(self) -> None:
        """Refuse new requests, run everything already queued, then end."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    # -- callers -----------------------------------------------------------------------------
    async def submit(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None, *, deadline: float | None = None
    ) -> BatchResult:
        """Queue one request and wait for its rows (or a 4xx/5xx domain error), until `timeout_s`
        from now or the request's `deadline` (loop time), whichever comes first."""
        key = self.model.key
        if self._closing:
            raise ModelNotReady(f"model {key} is shutting down")
        rows, pixels, batch_key = _rows_and_key(inputs)
        if self.policy.max_batch_size and rows > self.policy.max_batch_size:
            raise InvalidInput(
                f"batch of {rows} rows exceeds max_batch_size {self.policy.max_batch_size} of model {key}; "
                "send at most that many rows per request"
            )
        if len(self._queue) >= self.policy.max_queue_size:
            raise Overloaded(
                f"model {key} is overloaded: {len(self._queue)} requests queued "
                f"(max_queue_size {self.policy.max_queue_size}); retry later",
                retry_after_s=RETRY_AFTER_S,
            )
        item = _Pending(
            inputs=inputs,
            outputs=None if outputs is None else tuple(outputs),
            rows=rows,
            pixels=pixels,
            key=batch_key,
            enqueued=time.perf_counter(),
            future=asyncio.get_running_loop().create_future(),
            mark=None if self._tracing is None else self._tracing.enqueued(rows),
        )
        self._queue.append(item)
        self._depth.inc()
        self._wakeup.set()
        loop = asyncio.get_running_loop()
        until = loop.time() + self.policy.timeout_s
        try:
            async with asyncio.timeout_at(until if deadline is None else min(until, deadline)):
                return await asyncio.shield(item.future)
        except TimeoutError:
            was_queued = self._abandon(item)
            fate = "it was still queued and was not run" if was_queued else "its result is dropped"
            self._trace_abandoned(item, was_queued, "timed out")
            raise RequestTimeout(
                f"model {key}: inference did not finish within {self.policy.timeout_s:g} s "
                f"(NORMSERVE_REQUEST_TIMEOUT_S); {fate}"
            ) from None
        except asyncio.CancelledError:  # the client went away: its work is not needed
            self._trace_abandoned(item, self._abandon(item), "cancelled")
            raise

    def _trace_abandoned(self, item: _Pending, was_queued: bool, why: str) -> None:
        if self._tracing is not None and item.mark is not None and was_queued:
            self._tracing.queue_abandoned(self.model.name, self.model.version, item.mark, f"{why} in the queue")

    def _abandon(self, item: _Pending) -> bool:
        """Forget a request whose caller gave up; True if it was still queued (and so never runs)."""
        item.abandoned = True
        if not item.future.done():
            item.future.cancel()
        if not item.queued:
            # Taken into a batch: the thread skips it unless already started; a run whose every
            # caller gave up is told to stop (ORT checks the flag between operators). (Not looked
            # for with deque.remove: the ValueError of a miss has the item's repr as its message,
            # every array in it and in its batch printed: 11 ms of the event loop for one request
            # of a batch of 16 32x32 images, measured, for each client that went away.)
            if item.batch is not None and item.run_options is not None and all(i.abandoned for i in item.batch):
                item.run_options.terminate = True
            return not item.running
        item.queued = False
        self._queue.remove(item)  # by identity (eq=False)
        self._depth.dec()
        self._wakeup.set()  # the batch being gathered may have lost its oldest request
        return True

    # -- the batcher task --------------------------------------------------------------------
    async def _serve(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._free.acquire()  # gather only for a free instance: late requests still join
                batch = await self._gather() if self._queue else None
                if not batch:
                    self._free.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._run_batch(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                # not kept until the next batch: its inputs and answers (views of ORT's arena) would
                # stay alive in an idle worker, where the arena shrink cannot give their regions back
                del batch, task
        except asyncio.CancelledError:
            for task in self._running:
                task.cancel()
            raise
        finally:
            if self._running:  # stop() waits for the batches in flight
                await asyncio.gather(*self._running, return_exceptions=True)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            await self._execute(batch)
        except Exception:  # never let one batch stop the batcher
            log.exception("%s: batch of %d requests failed unexpectedly", self.model.key, len(batch))
            self._fail(batch, InferenceError(f"model {self.model.key}: internal batching error"))
        finally:
            self._free.release()

    def _select(self, oldest: _Pending) -> tuple[list[_Pending], bool]:
        """The queued requests that run with the oldest one, in arrival order, and whether the
        batch is full (no room for the next request that could have joined)."""
        if self.policy.max_batch_size == 0:
            return [oldest], True
        batch: list[_Pending] = []
        rows = pixels = 0
        for item in self._queue:
            if item.key != oldest.key:
                continue
            if batch and (
                rows + item.rows > self.policy.max_batch_size or pixels + item.pixels > self.policy.max_batch_pixels
            ):
                return batch, True
            batch.append(item)
            rows += item.rows
            pixels += item.pixels
        return batch, rows >= self.policy.max_batch_size

    async def _gather(self) -> list[_Pending] | None:
        """Wait until the oldest request's batch is full or its delay is up; take it off the queue.
        None when the oldest request was abandoned meanwhile (the caller starts over)."""
        oldest = self._queue[0]
        flush_at = oldest.enqueued + self.policy.max_queue_delay_ms / 1000
        while True:
            if oldest.abandoned:
                return None
            batch, full = self._select(oldest)
            wait = flush_at - time.perf_counter()
            if full or wait <= 0 or self._closing:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
        for item in batch:
            item.queued = False
        self._queue = deque(item for item in self._queue if item.queued)
        self._depth.dec(len(batch))
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        self._dispatched += len(batch)
        options = ort.RunOptions()
        pixels = [item.pixels for item in batch]
        if sum(pixels) > KEEP_ARENA_PIXELS or max(pixels) > KEEP_ARENA_REQUEST_PIXELS:
            # give a large run's activations back to the allocator when it ends, rather than keep
            # them in this session's arena (each session has its own; the memory budget counts a
            # run's memory as free once it has returned)
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        for item in batch:
            item.batch, item.run_options = batch, options
        try:
            live, results = await loop.run_in_executor(self._executor, self._run, batch, options)
        except asyncio.CancelledError:
            self._fail(batch, ModelNotReady(f"model {self.model.key} is shutting down"))
            raise
        except NormserveError as exc:
            self._fail(batch, exc)
            return
        finally:
            self._dispatched -= len(batch)
            for item in batch:  # no item -> batch -> item cycles left for the collector
                item.batch = item.run_options = None
        rows = sum(item.rows for item in live)
        if len(live) > 1:
            unbatched = sorted(name for name, value in results.items() if value.ndim == 0 or value.shape[0] != rows)
            if unbatched:
                self._fail(
                    live,
                    InferenceError(
                        f"model {self.model.key}: outputs {unbatched} do not have one row per input row "
                        f"({rows}); the model cannot be batched (set its max_batch_size to 1)"
                    ),
                )
                return
        start = 0
        for item in live:
            stop = start + item.rows
            names = item.outputs if item.outputs is not None else tuple(results)
            mine = results if len(live) == 1 else {n: results[n][start:stop] for n in names}
            if not item.future.done():
                item.future.set_result(BatchResult({n: mine[n] for n in names}, rows))
            start = stop

    def _run(self, batch: list[_Pending], options: ort.RunOptions) -> tuple[list[_Pending], dict[str, np.ndarray]]:
        """In an inference thread: drop abandoned requests, concatenate, run once."""
        started = time.perf_counter()
        live = [item for item in batch if not item.abandoned]
        if not live:
            return live, {}
        name = self.model.name
        for item in live:
            item.running = True
            self._queue_seconds.observe(started - item.enqueued)
        if len(live) == 1:
            inputs = live[0].inputs
        else:
            inputs = {n: np.concatenate([item.inputs[n] for item in live]) for n in live[0].inputs}
        # The union of what the callers asked for (every output if any caller wants them all).
        wanted: list[str] | None = None
        if all(item.outputs is not None for item in live):
            wanted = list(dict.fromkeys(o for item in live for o in item.outputs or ()))
        # With tracing on: each request's queue span ends here, and the batch's run span covers the run.
        run_span = (
            NO_SPAN
            if self._tracing is None
            else self._tracing.batch_started(name, self.model.version, [i.mark for i in live if i.mark is not None])
        )
        try:
            with run_span:
                return live, self.model.predict(inputs, wanted, run_options=options)
        finally:
            self._compute_seconds.observe(time.perf_counter() - started)
            self._batch_size.observe(sum(item.rows for item in live))

    def _fail(self, batch: list[_Pending], exc: NormserveError) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(type(exc)(exc.message))  # one exception object per caller


def run_pixels(inputs: dict[str, np.ndarray]) -> int:
    """Rows x H x W of a run: its first input's batch dimension times every dimension after the
    channels (the batcher's pixel budget and the wide-run threshold both count this)."""
    first = next(iter(inputs.values()))
    return first.size if first.ndim < 2 else first.shape[0] * math.prod(first.shape[2:])
