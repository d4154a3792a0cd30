"""A served model version and its lifecycle (after KServe's `Model`): load (config.json, the ONNX
Runtime session(s), the batch policy, the task object) → warm up → ready → `start` (its dynamic
batcher) → `infer` → `drain` (the batcher runs what is queued) → `stop` (the sessions dropped).

The server's repository (repository.py) starts and swaps whole versions, so a version a request
finds takes requests through its own batcher. Evaluation, benchmarks and scripts `load` a version
without starting it and call `predict` (a blocking run, no batcher) or the task's own methods.
Sessions are created by `load()`, never at import."""

from __future__ import annotations

import enum
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from normserve.contract import CONFIG_FILE, MODEL_FILE, REQUIRED_OUTPUTS, ModelConfigFile
from normserve.service.batching import BatchPolicy, ModelBatcher, run_pixels
from normserve.service.cores import CoreLock
from normserve.service.errors import InferenceError, InvalidInput, ModelNotReady
from normserve.service.metrics import Metrics
from normserve.service.settings import Settings
from normserve.service.tasks import Task, task_for
from normserve.service.tracing import Tracing

log = logging.getLogger("normserve.model")

WARMUP_HW = (64, 64)  # native-size models warm up at this size
# A run with these options frees the CPU arena's unused regions at its end (shrink_arena).
SHRINK_ARENA = ort.RunOptions()
SHRINK_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
# every graph the service opens, and every script that times graphs as the service would
GRAPH_OPTIMIZATION = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

# (file name, size, mtime in ns) of a version's model.onnx and config.json: a version whose
# fingerprint changed was rewritten, and repository polling loads it again (service/repository.py).
Fingerprint = tuple[tuple[str, int, int], ...]


class ModelState(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    STOPPED = "STOPPED"


@dataclass(frozen=True)
class Runtime:
    """What a started version shares with the rest of its server process: the inference threads,
    the metrics and tracing."""

    executor: Executor
    metrics: Metrics
    tracing: Tracing | None = None


class ServedModel:
    """One version of one model: its config.json, its ORT session(s), its batch policy and task,
    and, once started, its batcher."""

    def __init__(self, directory: Path, name: str, version: str) -> None:
        self.directory = directory
        self.name = name
        self.version = version
        self.state = ModelState.LOADING
        self.reason = ""  # why the model is not ready, for the ready endpoint and the log
        self.config: ModelConfigFile | None = None
        self.provider = ""  # the execution provider ORT actually uses
        self._session: ort.InferenceSession | None = None  # a run's share of the cores (instances side by side)
        self._wide: ort.InferenceSession | None = None  # every core, for a large run that has the machine to itself
        self._cores: CoreLock | None = None  # held around each run on the CPU (service/cores.py)
        self._wide_pixels = 0  # a run this large (rows x H x W) may go wide
        self._arena = False  # runs on ORT's CPU memory arena
        self.fingerprint: Fingerprint = ()  # its files when found on disk; polling reloads it when they change
        self.policy: BatchPolicy | None = None  # resolved once, at load, from the settings and config.json
        self.task: Task | None = None  # its pre- and post-processing (tasks.py), by config.json's task
        self.batcher: ModelBatcher | None = None  # while started: requests run through it

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self, settings: Settings, cores: CoreLock | None = None) -> None:
        """Read config.json, open the session, check the graph against the config, warm up.
        `cores`: the server's lock for runs on the CPU; without it (evaluation, benchmarks)
        there is no wide session and runs take no lock."""
        started = time.perf_counter()
        try:
            config = ModelConfigFile.load(self.directory / CONFIG_FILE)
            if config.name != self.name or config.version != self.version:
                raise ValueError(
                    f"config.json names {config.name}/{config.version} but sits in {self.name}/{self.version}"
                )
            wanted = settings.provider_list(ort.get_available_providers())
            session = self._open(settings, settings.ort_intra_threads(), wanted)
            _check_io(session, config)
            self.provider = session.get_providers()[0]
            # Threads only matter on the CPU; on a GPU a second session would only hold a second
            # copy of the weights and its own memory arena.
            on_cpu = self.provider == "CPUExecutionProvider"
            wide_threads = settings.ort_wide_threads() if on_cpu and cores is not None else 0
            wide = self._open(settings, wide_threads, wanted) if wide_threads else None
            self.config, self._session, self._wide = config, session, wide
            self._arena = on_cpu and settings.cpu_mem_arena  # what shrink_arena can give back
            self._cores, self._wide_pixels = (cores if on_cpu else None), settings.wide_run_pixels
            self.policy = BatchPolicy.resolve(settings, config)
            self.task = task_for(self, config, settings)
            if wanted[0] != self.provider:
                log.warning("%s: asked for %s, ORT runs it on %s", self.key, wanted[0], self.provider)
            if settings.warmup:
                self.warmup()
        except Exception as exc:  # one broken model must not take the server down
            self.state = ModelState.UNAVAILABLE
            reason = f"failed to load: {type(exc).__name__}: {exc}"
            self.reason = self.without_paths(reason)  # answered to anyone who asks: no server paths
            self._session = self._wide = self._cores = self.policy = self.task = None
            log.error("%s: %s", self.key, reason)
            return
        self.state = ModelState.READY
        self.reason = ""
        log.info(
            "%s ready on %s in %.2fs (trained=%s)",
            self.key,
            self.provider,
            time.perf_counter() - started,
            config.weights.trained,
        )

    def without_paths(self, text: str) -> str:
        """`text` with this version's folder, however spelt (as given, absolute, resolved), written
        as `<name>/<version>`: a reason is answered to unauthenticated clients (ready, index)."""
        forms = {str(self.directory), str(self.directory.absolute()), str(self.directory.resolve())}
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form, self.key)
        return text

    def _open(self, settings: Settings, threads: int, providers: list[str]) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = GRAPH_OPTIMIZATION
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.intra_op_spinning else "0")
        options.enable_cpu_mem_arena = settings.cpu_mem_arena
        return ort.InferenceSession(str(self.directory / MODEL_FILE), options, providers=providers)

    def warmup(self) -> None:
        cfg = self.require_config()
        hw = cfg.preprocessing.resize or WARMUP_HW
        channels = cfg.inputs[0].shape[1]
        x = {cfg.inputs[0].name: np.zeros((1, channels, *hw), np.float32)}
        for session in (self._session, self._wide):
            if session is not None:
                self._run(session, x, None)

    def shrink_arena(self) -> None:
        """Hand ONNX Runtime's CPU memory arena back: a run on the smallest input, with RunOptions
        that shrink the arena at its end, frees every arena region no tensor uses, i.e. all that
        the largest run since the last shrink grew it by (the arena otherwise keeps its peak for
        the process's life: measured 59 -> 1014 MiB after two runs of four 512x512 tiles, 95 MiB
        after this). Called by service/memory.py when the worker is quiet; blocking."""
        cfg, arena = self.config, self._arena
        if cfg is None or not self.ready or not arena:
            return
        hw = cfg.preprocessing.resize or (max(cfg.preprocessing.min_side, 8),) * 2
        x = {cfg.inputs[0].name: np.zeros((1, cfg.inputs[0].shape[1], *hw), np.float32)}
        for session in (self._session, self._wide):
            if session is not None:
                session.run(None, x, SHRINK_ARENA)

    def start(self, runtime: Runtime) -> None:
        """Take requests: start this ready version's batcher (a version that failed to load has none)."""
        if not self.ready or self.batcher is not None or self.policy is None:
            return
        self.batcher = ModelBatcher(self, runtime.executor, runtime.metrics, self.policy, runtime.tracing)
        self.batcher.start()
        log.info("%s batching: %s", self.key, self.policy)

    async def drain(self) -> None:
        """Take no new requests; run everything already queued (the batcher stops after that)."""
        batcher = self.batcher
        if batcher is not None:
            await batcher.stop()

    def stop(self) -> None:
        """Drop the sessions (after `drain`, when it was started)."""
        self._session = self._wide = self._cores = None
        self.state = ModelState.STOPPED

    # -- serving -----------------------------------------------------------------------------
    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    def require_config(self) -> ModelConfigFile:
        if self.config is None:
            raise ModelNotReady(f"model {self.key} is not ready: {self.reason or self.state.value}")
        return self.config

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None = None,
        state: Any = None,
        *,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run this version through its dynamic batcher (off the event loop); this request's rows
        come back. `deadline` (loop time): a request still queued then is dropped (504). `state`
        (HTTP's `request.state`, gRPC's own object) gets `model`, `model_version` and
        `batch_size` (rows of the run the request was part of) for the metrics and access log."""
        if state is not None:
            state.model, state.model_version = self.name, self.version
        batcher = self.batcher
        if batcher is None:
            raise ModelNotReady(f"model {self.key} is not serving: it failed to load or was just unloaded")
        result = await batcher.submit(inputs, outputs, deadline=deadline)
        if state is not None:
            state.batch_size = result.batch_rows
        # The arrays go to the caller alone. They view ORT's arena (its outputs are not copied),
        # and an arena region with any array alive in it cannot be given back by the idle trim;
        # the batcher's loop keeps its last batch, this result included, until it takes the next
        # (measured: 2 x 64 MiB regions held in an idle worker after gRPC feature maps, issue 26).
        answer = dict(result.outputs)
        result.outputs.clear()
        return answer

    def predict(
        self,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None = None,
        *,
        run_options: ort.RunOptions | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the graph now, without the batcher. Blocking: callers run it off the event loop. On
        the CPU the run holds the server's core lock; a run of at least `wide_run_pixels` goes to
        the session on every core when no other run is in progress in any worker (service/cores.py)."""
        session, wide, cores = self._session, self._wide, self._cores
        if session is None or not self.ready:
            raise ModelNotReady(f"model {self.key} is not ready: {self.reason or self.state.value}")
        if cores is None:
            return self._run(session, inputs, outputs, run_options)
        with cores.hold(wide is not None and run_pixels(inputs) >= self._wide_pixels) as alone:
            return self._run(wide if alone and wide is not None else session, inputs, outputs, run_options)

    def _run(
        self,
        session: ort.InferenceSession,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None,
        run_options: ort.RunOptions | None = None,
    ) -> dict[str, np.ndarray]:
        names = outputs or [o.name for o in session.get_outputs()]
        try:
            results = session.run(names, inputs, run_options)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ValueError) as exc:
            raise InvalidInput(f"model {self.key} rejected the input: {exc}") from None
        except Exception as exc:
            raise InferenceError(f"model {self.key} failed: {type(exc).__name__}: {exc}") from exc
        return dict(zip(names, results, strict=True))


def _check_io(session: ort.InferenceSession, config: ModelConfigFile) -> None:
    """The graph's inputs and outputs must be the ones config.json declares."""
    graph_in = [i.name for i in session.get_inputs()]
    graph_out = [o.name for o in session.get_outputs()]
    if graph_in != [t.name for t in config.inputs] or graph_out != [t.name for t in config.outputs]:
        raise ValueError(
            f"graph inputs/outputs {graph_in}/{graph_out} differ from config.json "
            f"{[t.name for t in config.inputs]}/{[t.name for t in config.outputs]}"
        )
    required = REQUIRED_OUTPUTS[config.task]
    if required not in graph_out:
        raise ValueError(f"a {config.task} graph needs an output named {required!r}; it has {graph_out}")
