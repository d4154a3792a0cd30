"""A served model version owns its runtime: loaded, it has its batch policy and task object;
started, it takes requests through its own batcher; drained, it refuses new ones; stopped, it has
no session. The repository starts every version it swaps in once it serves. Real sessions on the
shipped models."""

from __future__ import annotations

import asyncio
import gc
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import shipped
from conftest import SettingsFactory

from normserve.contract import LOGITS_OUTPUT
from normserve.service.errors import InvalidInput, ModelNotReady
from normserve.service.metrics import Metrics
from normserve.service.model import Runtime, ServedModel
from normserve.service.repository import ModelRepository, Plan, scan
from normserve.service.tasks import ClassificationTask, DenoisingTask, task_of, top_k


def _loaded(settings_factory: SettingsFactory, name: str = "gncnn") -> ServedModel:
    settings = settings_factory(warmup=False)
    repository = ModelRepository(settings.model_repository, settings)
    model = repository.find(name)
    repository.load(model)
    assert model.ready, model.reason
    return model


def test_a_version_serves_through_its_own_batcher_from_start_to_drain(settings_factory: SettingsFactory) -> None:
    model = _loaded(settings_factory)
    assert model.policy is not None and isinstance(model.task, ClassificationTask)
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    reference = model.predict({"image": x}, [LOGITS_OUTPUT])[LOGITS_OUTPUT]

    async def scenario() -> None:
        with pytest.raises(ModelNotReady, match="not serving"):  # loaded, not started
            await model.infer({"image": x}, [LOGITS_OUTPUT])
        with ThreadPoolExecutor(max_workers=1) as executor:
            model.start(Runtime(executor, Metrics()))
            assert model.batcher is not None and model.batcher.policy is model.policy
            out = await model.infer({"image": x}, [LOGITS_OUTPUT])
            np.testing.assert_allclose(out[LOGITS_OUTPUT], reference, rtol=0, atol=1e-5)
            await model.drain()
            with pytest.raises(ModelNotReady, match="shutting down"):
                await model.infer({"image": x}, [LOGITS_OUTPUT])

    asyncio.run(scenario())
    model.stop()
    with pytest.raises(ModelNotReady):
        model.predict({"image": x})


@pytest.mark.parametrize("outputs", [None, [LOGITS_OUTPUT]])
def test_an_answer_keeps_no_output_alive_once_its_caller_drops_it(
    settings_factory: SettingsFactory, outputs: list[str] | None
) -> None:
    """The outputs view ORT's arena (no copy): while any of them lives, the arena region it sits
    in stays allocated and the idle trim cannot give it back (issue 26). Once the caller lets go
    of its answer, nothing else (the batcher's last batch included) may keep them."""
    model = _loaded(settings_factory)
    x = np.zeros((1, 3, 64, 64), np.float32)

    async def scenario() -> list[bool]:
        with ThreadPoolExecutor(max_workers=1) as executor:
            model.start(Runtime(executor, Metrics()))
            out = await model.infer({"image": x}, outputs)
            assert set(out) == set(outputs or [o.name for o in model.require_config().outputs])
            refs = [weakref.ref(a) for a in out.values()]
            del out
            gc.collect()
            alive = [r() is not None for r in refs]  # while the batcher still runs, as between requests
            await model.drain()
            return alive

    alive = asyncio.run(scenario())
    model.stop()
    assert not any(alive), "an output of an answered request is still referenced"


def test_swap_starts_the_versions_it_adds_once_the_repository_serves(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(warmup=False, version_policy="latest:1")
    repository = ModelRepository(settings.model_repository, settings)
    repository.load_all()

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as executor:
            repository.serve(Runtime(executor, Metrics()))
            assert all(m.batcher is not None for m in repository.all())
            on_disk = scan(repository.root)["gncnn"]
            older = shipped.versions("gncnn")[-2]
            model = repository.new_model("gncnn", older, on_disk[older])
            repository.load(model)
            # serve the older version instead of the newest
            added, retired = repository.swap(Plan("gncnn", on_disk, [older], [older], {older: model}))
            assert [m.version for m in added] == [older] and added[0].batcher is not None
            assert [m.version for m in retired] == [shipped.GNCNN]
            await asyncio.gather(*(m.drain() for m in [*repository.all(), *retired]))

    asyncio.run(scenario())


def test_a_route_needs_a_task_of_its_kind(settings_factory: SettingsFactory) -> None:
    denoiser = _loaded(settings_factory, "in_autoencoder")
    assert isinstance(task_of(denoiser, DenoisingTask), DenoisingTask)
    with pytest.raises(InvalidInput, match="is a denoising model; this route needs a classification model"):
        task_of(denoiser, ClassificationTask)


@pytest.mark.parametrize(
    ("scores", "k", "expected"),
    [
        ([[0.1, 0.7, 0.2]], 2, [[1, 2]]),
        ([[0.5, 0.5, 0.1, 0.5]], 3, [[0, 1, 3]]),  # ties keep the lower index first
        ([[3.0, 1.0]], 5, [[0, 1]]),  # k above the class count: every class
        ([[1.0, 2.0], [2.0, 1.0]], 1, [[1], [0]]),  # per row
    ],
)
def test_top_k_ranks_each_row(scores: list[list[float]], k: int, expected: list[list[int]]) -> None:
    assert top_k(np.asarray(scores, np.float32), k).tolist() == expected


def test_top_k_of_no_rows_is_empty() -> None:
    assert top_k(np.zeros((0, 10), np.float32), 5).shape == (0, 5)
