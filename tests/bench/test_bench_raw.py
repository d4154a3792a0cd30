"""Raw in-process ORT and the ORT vs torch comparison, at tiny scale."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from normserve.bench.payloads import Workload
from normserve.bench.raw import RawOrt, ort_vs_torch, server_settings
from normserve.service.settings import usable_cpus


def test_raw_ort_measures_each_model_and_batch(
    committed_model_repository: Path, workloads: dict[str, Workload]
) -> None:
    with RawOrt(committed_model_repository, {}, 0.05, batches={32: (1, 4), 256: (1,)}) as raw:
        for name in ("classify", "v2", "reconstruct256"):
            w = workloads[name]
            raw.measure(w.model, w.output, w.tensor)
        results, info = raw.results, raw.info()
    assert set(results) == {("gncnn", 32), ("in_autoencoder", 256)}  # classify and v2 share one
    assert list(results[("gncnn", 32)].per_batch) == [1, 4]
    assert all(v > 0 for r in results.values() for v in r.per_batch.values())
    assert all(set(r.other_cores) == set(r.per_batch) for r in results.values())
    assert results[("in_autoencoder", 256)].best_batch == 1
    cpus = usable_cpus()
    served = f"{info['server_instances']}x{info['intra_op_threads']}"  # the server's default, one worker
    assert info["layouts"] == list(dict.fromkeys([f"1x{cpus}", served]))
    for r in results.values():  # each batch's figure is the better layout's
        assert set(r.by_layout) == set(info["layouts"])
        for b, v in r.per_batch.items():
            assert r.layout[b] in info["layouts"] and v == max(d[b] for d in r.by_layout.values())


def test_server_settings_follow_server_env(committed_model_repository: Path) -> None:
    settings = server_settings(committed_model_repository, {"NORMSERVE_INTRA_OP_THREADS": "1"})
    assert settings.ort_intra_threads() == 1


def test_ort_vs_torch_times_both(committed_model_repository: Path) -> None:
    pytest.importorskip("torch")
    out = ort_vs_torch(committed_model_repository, {}, 0.05, cases=(("gncnn", 2, 32),))
    assert not isinstance(out, str), out
    for c in out:
        assert c.shape == [2, 3, 32, 32] and c.ort_ms > 0 and c.torch_ms > 0
        assert c.speedup == pytest.approx(c.torch_ms / c.ort_ms)
        assert c.other_cores >= 0
    # The served (newest) version first; an int8 one is followed by its fp32 sibling.
    assert out[0].served and not any(c.served for c in out[1:])
    assert [c.precision for c in out] == (["int8", "fp32"] if out[0].precision == "int8" else ["fp32"])
    assert len({c.version for c in out}) == len(out)


def test_ort_vs_torch_skips_without_torch(committed_model_repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    out = ort_vs_torch(committed_model_repository, {}, 0.05)
    assert isinstance(out, str) and out.startswith("skipped: torch is not installed")
