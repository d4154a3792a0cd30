"""In-process model throughput: what the machine can do with no HTTP in the way.

`RawOrt` runs the served models as the server builds them (`ServedModel.load`: same session
options) on the tensors the server would build from the bench's images, at batch 1 and at larger
batches, in two layouts of the same cores: one stream of runs on every core's thread, and the
server's layout (its model instances, each a stream of runs on its share of the threads, side by
side). The raw figure for a batch is the better layout, so the server is compared with the best
the machine does, not with the layout it happens to use. `ort_vs_torch` times PyTorch eager on
the same modules the ONNX graphs were exported from (needs the export extra; skipped without it).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normserve.bench.servers import machine_cpu_seconds
from normserve.contract import REQUIRED_OUTPUTS
from normserve.files import sha256_file
from normserve.service.model import ServedModel
from normserve.service.repository import ModelRepository
from normserve.service.settings import Settings

log = logging.getLogger("normserve.bench")

NOISY_OTHER_CORES = 0.25  # other work above this many cores during a measurement makes it unreliable

# Batches tried per image side; the largest stay within a few hundred MB of activations.
BATCHES: dict[int, tuple[int, ...]] = {32: (1, 8, 32, 64), 256: (1, 4, 8), 512: (1, 2, 4)}


@contextmanager
def clean_environ(overrides: dict[str, str]) -> Iterator[None]:
    """os.environ without NORMSERVE_* plus `overrides`, for the duration (Settings reads it)."""
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("NORMSERVE_")]:
            del os.environ[key]
        os.environ.update(overrides)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def server_settings(repository: Path, server_env: dict[str, str]) -> Settings:
    """The settings a one-worker server started with `server_env` would read (no .env file):
    the raw measurement is one process that owns the whole machine."""
    with clean_environ({**server_env, "NORMSERVE_WORKERS": "1"}):
        return Settings(_env_file=None, model_repository=repository)  # type: ignore[call-arg]


@dataclass
class Timing:
    calls: int
    elapsed: float  # seconds
    other_cores: float  # CPU cores used meanwhile by processes other than this one

    @property
    def ms_per_call(self) -> float:
        return self.elapsed / self.calls * 1000.0


def time_calls(fn: Callable[[], object], seconds: float, min_calls: int = 3) -> Timing:
    """Call `fn` until `seconds` have passed (at least `min_calls` times), watching what else
    the machine does meanwhile."""
    calls, machine, own, started = 0, machine_cpu_seconds(), time.process_time(), time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and calls >= min_calls:
            other = (machine_cpu_seconds() - machine) - (time.process_time() - own)
            return Timing(calls, elapsed, max(0.0, other) / elapsed)


def time_streams(fn: Callable[[], object], streams: int, seconds: float, min_calls: int = 3) -> Timing:
    """`time_calls` with `streams` threads calling `fn` side by side (ORT releases the GIL in a run)."""
    if streams == 1:
        return time_calls(fn, seconds, min_calls)
    counts = [0] * streams
    machine, own, started = machine_cpu_seconds(), time.process_time(), time.perf_counter()

    def loop(i: int) -> None:
        while True:
            fn()
            counts[i] += 1
            if time.perf_counter() - started >= seconds and counts[i] >= min_calls:
                return

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    other = (machine_cpu_seconds() - machine) - (time.process_time() - own)
    return Timing(sum(counts), elapsed, max(0.0, other) / elapsed)


@dataclass(frozen=True)
class Layout:
    """How raw runs use the cores: `streams` runs side by side, each on `threads` ORT threads."""

    streams: int
    threads: int

    def __str__(self) -> str:
        return f"{self.streams}x{self.threads}"


@dataclass
class RawResult:
    model: str
    side: int
    per_batch: dict[int, float] = field(default_factory=dict)  # batch -> images/s
    ms_per_run: dict[int, float] = field(default_factory=dict)  # batch -> ms per session.run
    other_cores: dict[int, float] = field(default_factory=dict)  # batch -> other work's CPU meanwhile
    layout: dict[int, str] = field(default_factory=dict)  # batch -> the layout that gave per_batch
    by_layout: dict[str, dict[int, float]] = field(default_factory=dict)  # layout -> batch -> images/s

    @property
    def batch1(self) -> float:
        return self.per_batch[1]

    @property
    def best_batch(self) -> int:
        return max(self.per_batch, key=lambda b: self.per_batch[b])

    @property
    def best(self) -> float:
        return self.per_batch[self.best_batch]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "side": self.side,
            "images_per_s": {str(b): v for b, v in self.per_batch.items()},
            "ms_per_run": {str(b): v for b, v in self.ms_per_run.items()},
            "batch1_per_s": self.batch1,
            "best_per_s": self.best,
            "best_batch": self.best_batch,
            "other_cores": {str(b): v for b, v in self.other_cores.items()},
            "layout": {str(b): v for b, v in self.layout.items()},
            "by_layout": {k: {str(b): v for b, v in d.items()} for k, d in self.by_layout.items()},
        }


def measure_model(
    models: dict[Layout, ServedModel], output: str, tensor: np.ndarray, batches: tuple[int, ...], seconds: float
) -> RawResult:
    """Images/s per batch size, the better of the layouts (each model loaded for its layout)."""
    first = next(iter(models.values()))
    name = first.require_config().inputs[0].name
    result = RawResult(first.name, int(tensor.shape[-1]))
    for batch in batches:
        x = np.ascontiguousarray(np.repeat(tensor, batch, axis=0))
        for layout, model in models.items():
            model.predict({name: x}, [output])  # first run at this shape allocates
            timing = time_streams(functools.partial(model.predict, {name: x}, [output]), layout.streams, seconds)
            rate = timing.calls * batch / timing.elapsed
            result.by_layout.setdefault(str(layout), {})[batch] = rate
            if rate > result.per_batch.get(batch, 0.0):
                result.per_batch[batch] = rate
                result.ms_per_run[batch] = timing.ms_per_call * layout.streams  # one run's wall time
                result.other_cores[batch] = timing.other_cores
                result.layout[batch] = str(layout)
    return result


class RawOrt:
    """The served models in this process, loaded as a one-worker server loads them; `measure`
    times one workload's tensor at each batch size (once per model and image side). Kept open
    through a bench run so each workload is timed right before its servers are, under the same
    conditions."""

    def __init__(
        self,
        repository: Path,
        server_env: dict[str, str],
        seconds: float,
        batches: dict[int, tuple[int, ...]] = BATCHES,
    ) -> None:
        self.settings = server_settings(repository, server_env)
        self.seconds = seconds
        self.batches = batches
        self.results: dict[tuple[str, int], RawResult] = {}
        served = Layout(self.settings.instances(), self.settings.ort_intra_threads())
        one_stream = Layout(1, self.settings.cpus_per_worker())
        self.layouts = list(dict.fromkeys([one_stream, served]))
        self._repos: dict[Layout, ModelRepository] = {}
        for layout in self.layouts:
            env = {
                **server_env,
                "NORMSERVE_MODEL_INSTANCES": str(layout.streams),
                "NORMSERVE_INTRA_OP_THREADS": str(layout.threads),
            }
            repo = ModelRepository(repository, server_settings(repository, env))
            repo.load_all()
            self._repos[layout] = repo

    def measure(self, model: str, output: str, tensor: np.ndarray) -> RawResult:
        key = (model, int(tensor.shape[-1]))
        if key not in self.results:
            tried = self.batches.get(key[1], (1, 4))
            models = {layout: repo.get(model) for layout, repo in self._repos.items()}
            self.results[key] = measure_model(models, output, tensor, tried, self.seconds)
        return self.results[key]

    def info(self) -> dict[str, Any]:
        return {
            "layouts": [str(layout) for layout in self.layouts],  # streams x intra-op threads
            "server_instances": self.settings.instances(),
            "intra_op_threads": self.settings.ort_intra_threads(),
            "inter_op_threads": self.settings.inter_op_threads,
            "providers": self.settings.providers,
        }

    def close(self) -> None:
        for repo in self._repos.values():
            repo.stop_all()

    def __enter__(self) -> RawOrt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class TorchComparison:
    model: str
    shape: list[int]
    ort_ms: float
    torch_ms: float
    threads: int
    other_cores: float  # the most other work used during either timing
    version: str = ""
    precision: str = "fp32"  # of the ONNX graph; torch always runs fp32
    served: bool = True  # the version the routes use (the newest), not an older fp32 sibling

    @property
    def speedup(self) -> float:
        """ORT throughput / torch eager throughput."""
        return self.torch_ms / self.ort_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "shape": self.shape,
            "ort_ms": self.ort_ms,
            "torch_ms": self.torch_ms,
            "threads": self.threads,
            "ort_over_torch": self.speedup,
            "other_cores": self.other_cores,
            "version": self.version,
            "precision": self.precision,
            "served": self.served,
        }


# (model, batch, side): the classifier at batch 32 and the denoiser at 256² are the targets.
TORCH_CASES: tuple[tuple[str, int, int], ...] = (
    ("gncnn", 1, 32),
    ("gncnn", 32, 32),
    ("in_autoencoder", 1, 256),
    ("in_autoencoder", 1, 512),
)


def _with_fp32_sibling(repo: ModelRepository, served: ServedModel) -> list[ServedModel]:
    """The served version and, when it is quantized, the newest fp32 version of the same weights
    (so the report shows what quantization buys next to what ORT alone does)."""
    config = served.require_config()
    if not config.quantization:
        return [served]
    siblings = [
        m
        for m in repo.all()
        if m.name == served.name
        and m.ready
        and not m.require_config().quantization
        and m.require_config().weights.sha256 == config.weights.sha256
    ]
    return [served, *sorted(siblings, key=lambda m: int(m.version))[-1:]]


def ort_vs_torch(
    repository: Path, server_env: dict[str, str], seconds: float, cases: tuple[tuple[str, int, int], ...] = TORCH_CASES
) -> list[TorchComparison] | str:
    """ORT (as served) vs PyTorch eager on the same module, same threads, same input; or the
    reason it was skipped."""
    try:
        import torch

        from normserve.export.onnx_export import wrap_for_export
        from normserve.models.registry import ModelSpec, build_model
    except ModuleNotFoundError as exc:
        return f"skipped: torch is not installed ({exc}); pip install 'normserve[export]' to compare"
    import normserve.models as models

    # One stream on every core's thread for both (the server's instances would split the cores).
    # Every version: a served int8 graph is compared with its fp32 sibling, an older version.
    settings = server_settings(
        repository, {"NORMSERVE_MODEL_INSTANCES": "1", "NORMSERVE_VERSION_POLICY": "all", **server_env}
    )
    threads = settings.ort_intra_threads()
    repo = ModelRepository(repository, settings)
    repo.load_all()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    out: list[TorchComparison] = []
    try:
        for name, batch, side in cases:
            served = repo.get(name)
            for model in _with_fp32_sibling(repo, served):
                config = model.require_config()
                spec = ModelSpec.from_dict(config.model)
                # The shipped weights when they are the ones exported; else random ones (speed is the same).
                shipped = Path(models.__file__).parent / "weights" / config.weights.file
                exported = shipped.is_file() and sha256_file(shipped) == config.weights.sha256
                module = wrap_for_export(spec.kind, build_model(spec, shipped if exported else None), config.tta).eval()
                x = rng.random((batch, 3, side, side), dtype=np.float32)
                output = REQUIRED_OUTPUTS[config.task]
                inputs = {config.inputs[0].name: x}
                model.predict(inputs, [output])
                ort = time_calls(functools.partial(model.predict, inputs, [output]), seconds)
                xt = torch.from_numpy(x)
                with torch.inference_mode():
                    module(xt)
                    eager = time_calls(functools.partial(module, xt), seconds)
                other = max(ort.other_cores, eager.other_cores)
                out.append(
                    TorchComparison(
                        name,
                        [batch, 3, side, side],
                        ort.ms_per_call,
                        eager.ms_per_call,
                        threads,
                        other,
                        model.version,
                        config.precision,
                        model is served,
                    )
                )
    finally:
        repo.stop_all()
    return out
