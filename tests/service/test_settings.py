"""Settings derived at start-up."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import CpuSetter, SettingsFactory

from normserve.service.cores import CoreLock
from normserve.service.repository import ModelRepository
from normserve.service.settings import Settings, cgroup_cpu_limit, usable_cpus


@pytest.mark.parametrize(
    ("allowed", "workers", "instances", "threads"),
    [({0}, 1, 1, 1), ({0, 1}, 1, 2, 1), ({0, 1, 2, 3}, 1, 2, 2), ({0, 1, 2, 3}, 2, 2, 1), ({0, 1, 2, 3}, 4, 1, 1)],
)
def test_default_instances_and_ort_threads_share_the_cpus_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch, cpus: CpuSetter, allowed: set[int], workers: int, instances: int, threads: int
) -> None:
    # Under taskset or a cgroup cpuset the machine has more CPUs than the process may use.
    cpus(allowed)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    settings = Settings(workers=workers)
    assert (settings.instances(), settings.ort_intra_threads()) == (instances, threads)


def test_explicit_instances_and_ort_threads_win(cpus: CpuSetter) -> None:
    cpus(8)
    chosen = Settings(intra_op_threads=3, workers=2)  # threads chosen, instances auto: one per worker
    assert (chosen.instances(), chosen.ort_intra_threads()) == (1, 3)
    both = Settings(intra_op_threads=2, model_instances=2)
    assert (both.instances(), both.ort_intra_threads()) == (2, 2)
    one = Settings(model_instances=1)
    assert (one.instances(), one.ort_intra_threads()) == (1, 8)
    four = Settings(model_instances=4, workers=2)
    assert (four.instances(), four.ort_intra_threads()) == (4, 1)


@pytest.mark.parametrize(("spinning", "entry"), [(True, "1"), (False, "0")])
def test_sessions_get_the_thread_settings(
    settings_factory: SettingsFactory,
    spinning: bool,
    entry: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cpus: CpuSetter,
) -> None:
    cpus(4)
    # Runs of 3 or more 32 x 32 images may go wide; runs of 1 or 2 never do.
    settings = settings_factory(intra_op_spinning=spinning, warmup=False, wide_run_pixels=3 * 32 * 32)
    cores = CoreLock(tmp_path)
    repo = ModelRepository(settings.model_repository, settings, cores)
    repo.load_all()
    try:
        model = repo.get("gncnn")
        assert model.ready, model.reason
        for session, threads in ((model._session, 2), (model._wide, 4)):  # 4 CPUs: 2 instances; wide: all 4
            options = session.get_session_options()  # type: ignore[union-attr]
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == entry
            assert options.intra_op_num_threads == threads
        used: list[int] = []
        for session, threads in ((model._session, 2), (model._wide, 4)):
            run = session.run  # type: ignore[union-attr]
            monkeypatch.setattr(session, "run", lambda *a, _run=run, _t=threads, **k: used.append(_t) or _run(*a, **k))
        rng = np.random.default_rng(0)
        large = {"image": rng.random((3, 3, 32, 32), dtype=np.float32)}
        small = {"image": large["image"][:2]}
        wide_logits = model.predict(large)["logits"]  # nothing else runs: every core
        model.predict(small)  # too small to go wide
        with cores.hold(wide=False):  # another run is in progress (any thread, any worker)
            narrow_logits = model.predict(large)["logits"]
        assert used == [4, 2, 2]
        np.testing.assert_allclose(wide_logits, narrow_logits, atol=1e-5)  # same answer either way
    finally:
        repo.stop_all()


def test_without_the_core_lock_there_is_no_wide_session(settings_factory: SettingsFactory, cpus: CpuSetter) -> None:
    # Evaluation and the benchmark's raw ORT load models without a server: nothing to coordinate with.
    cpus(4)
    settings = settings_factory(warmup=False)
    repo = ModelRepository(settings.model_repository, settings)
    repo.load_all()
    try:
        model = repo.get("gncnn")
        assert model.ready and model._wide is None and model._cores is None
    finally:
        repo.stop_all()


def test_no_wide_session_on_a_gpu(
    settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpus: CpuSetter
) -> None:
    # As if ORT had put the graph on CUDA: threads do not matter there, and a second session
    # would hold a second copy of the weights on the GPU. Its runs take no core lock either.
    cpus(4)
    monkeypatch.setattr(ort.InferenceSession, "get_providers", lambda _self: ["CUDAExecutionProvider"])
    settings = settings_factory(warmup=False)
    assert settings.ort_wide_threads() == 4
    repo = ModelRepository(settings.model_repository, settings, CoreLock(tmp_path))
    repo.load_all()
    try:
        model = repo.get("gncnn")
        assert model.ready and model.provider == "CUDAExecutionProvider"
        assert model._wide is None and model._cores is None
    finally:
        repo.stop_all()


@pytest.mark.parametrize(
    ("overrides", "wide"),
    [({}, 4), ({"model_instances": 1}, 0), ({"intra_op_threads": 2}, 0), ({"workers": 4}, 4), ({"workers": 2}, 4)],
)
def test_a_wide_run_gets_every_core_of_the_machine_unless_a_run_has_them_all_already(
    cpus: CpuSetter, overrides: dict[str, int], wide: int
) -> None:
    cpus(4)
    assert Settings(**overrides).ort_wide_threads() == wide  # type: ignore[arg-type]


# -- a cgroup CPU quota (docker run --cpus, Kubernetes limits.cpu) --------------------------------


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, no limit
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: rounded up, as loky and the JDK do
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "400000 50000\n"}, 8),  # another period
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # cgroup v1, no limit
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
        ({}, None),  # no cgroup files at all
        ({"cpu.max": "garbage\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000\n"}, None),  # v1 quota without a period
    ],
)
def test_cgroup_cpu_limit(tmp_path: Path, files: dict[str, str], limit: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit


@pytest.mark.parametrize(
    ("allowed", "quota", "usable", "workers", "instances", "threads", "wide"),
    [
        (8, None, 8, 2, 2, 2, 8),  # the affinity mask alone
        (8, 2, 2, 2, 1, 1, 2),  # docker run --cpus 2 on an 8-CPU host: 2 workers x 1 thread, lone runs on 2
        (8, 1, 1, 1, 1, 1, 0),  # --cpus 1: one worker, one thread
        (8, 1.5, 2, 2, 1, 1, 2),
        (2, 4, 2, 2, 1, 1, 2),  # a quota above the mask changes nothing
    ],
)
def test_the_defaults_follow_a_cgroup_cpu_quota(
    cpus: CpuSetter,
    allowed: int,
    quota: float | None,
    usable: int,
    workers: int,
    instances: int,
    threads: int,
    wide: int,
) -> None:
    cpus(allowed, quota)
    assert usable_cpus() == usable
    settings = Settings(workers=0)  # 0: the default count
    assert settings.workers == workers
    assert (settings.instances(), settings.ort_intra_threads(), settings.ort_wide_threads()) == (
        instances,
        threads,
        wide,
    )
