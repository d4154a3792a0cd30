"""The served model, opened exactly as the service opens it, and latency timing.

`open_served_model` goes through the service's own `ModelRepository` and `ServedModel.load`:
the same session options, provider choice, graph/config I/O check and warm-up as `normserve serve`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import onnxruntime as ort

from normserve.contract import MODEL_FILE
from normserve.files import sha256_file
from normserve.service.errors import NormserveError
from normserve.service.model import GRAPH_OPTIMIZATION, ServedModel
from normserve.service.repository import ModelRepository
from normserve.service.settings import Settings

K = TypeVar("K")


class EvaluationError(Exception):
    """A problem with the arguments, the model or the data; the CLI prints it and exits 2."""


def open_served_model(
    repository: Path, name: str, version: str | None, threads: int, providers: str
) -> tuple[ServedModel, Settings]:
    """Load one model version with `threads` ORT intra-op threads; raise with the reason if it cannot."""
    try:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            model_repository=repository,
            version_policy="all",  # any version may be evaluated, not only the ones a server would load
            intra_op_threads=threads,
            providers=providers,
        )
        model = ModelRepository(repository, settings).find(name, version)
    except (NormserveError, FileNotFoundError, ValueError) as exc:
        raise EvaluationError(str(exc)) from None
    model.load(settings)
    if not model.ready:
        raise EvaluationError(f"{model.key}: {model.reason}")
    return model, settings


def model_facts(model: ServedModel) -> dict[str, Any]:
    """What identifies the evaluated artifact: name, version, graph hash, provider, trained flag."""
    config = model.require_config()
    return {
        "name": model.name,
        "version": model.version,
        "directory": str(model.directory),
        "onnx_sha256": sha256_file(model.directory / MODEL_FILE),
        "weights_sha256": config.weights.sha256,
        "trained": config.weights.trained,
        "kind": config.kind,
        "execution_provider": model.provider,
    }


def time_calls(fn: Callable[[], object], runs: int, warmup: int = 3) -> dict[str, float]:
    """Milliseconds per call of `fn`: median, p90 and min wall time of `runs` timed calls after
    `warmup` untimed ones, and the median process CPU time per call (every thread, ORT's
    spin-waiting included): on a busy machine wall time grows, CPU time much less."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
        cpu.append((time.process_time() - start_cpu) * 1000.0)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "min_ms": times[0],
        "cpu_median_ms": statistics.median(cpu),
        "runs": runs,
        "warmup": warmup,
    }


def cpu_session(path: Path, threads: int) -> ort.InferenceSession:
    """A bare ORT CPU session for a graph file, optimised as the service optimises (GRAPH_OPTIMIZATION),
    with `threads` intra-op threads: for scripts that compare graphs outside a model repository."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = GRAPH_OPTIMIZATION
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_interleaved(calls: Mapping[K, Callable[[], object]], rounds: int, warmup: int = 3) -> dict[K, float]:
    """Median wall seconds per call of each of `calls`, after `warmup` untimed calls each, timed in
    `rounds` rounds that call each once in turn: a machine that slows down mid-way slows them all
    alike, so the ratios between them hold on a noisy machine."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[K, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(t) for k, t in times.items()}
