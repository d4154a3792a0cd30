"""Dynamic batching on the real app and the shipped models: requests that can share a run do,
each caller gets exactly its own rows, requests that cannot share a run never do, and the limits
(rows, pixels, delay) decide where a batch ends; with several model instances that many batches
run at once and the next one is gathered only when an instance is free. Queueing is made
deterministic by holding the inference threads (`ExecutorGate`) rather than by timing; the
queueing tests pin one instance."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shipped
from conftest import SettingsFactory
from inprocess import ExecutorGate, batcher, metric, serving, until, v2_request
from starlette.types import ASGIApp, Receive, Scope, Send

from normserve.service.batching import BatchResult
from normserve.service.errors import ModelNotReady
from normserve.service.model import ServedModel

GNCNN = f"gncnn/{shipped.GNCNN}"


def _images(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(s, dtype=np.float32) for s in shapes]


def _alone(model: ServedModel, x: np.ndarray, outputs: list[str] | None) -> dict[str, np.ndarray]:
    """The reference: the same model on this input alone, without the batcher."""
    return model.predict({"image": x}, outputs)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


ROW_PATTERNS = {"four single rows": (1, 1, 1, 1), "mixed V2 batches": (2, 1, 3), "one request": (5,)}
OUTPUT_CHOICES: list[list[str] | None] = [["logits"], ["p3", "logits"], None, ["p5"]]


@pytest.mark.parametrize("rows", list(ROW_PATTERNS.values()), ids=list(ROW_PATTERNS))
def test_same_shape_requests_share_one_run_and_each_gets_its_own_rows(
    settings_factory: SettingsFactory, rows: tuple[int, ...]
) -> None:
    # The batch fills exactly at max_batch_size, so it runs at once; the long delay shows that
    # a full batch does not wait for it.
    settings = settings_factory(max_batch_size=sum(rows), max_queue_delay_ms=60_000)
    xs = _images(0, *[(n, 3, 32, 32) for n in rows])
    wanted = [OUTPUT_CHOICES[i % len(OUTPUT_CHOICES)] for i in range(len(rows))]

    async def scenario() -> None:
        async with serving(settings) as (app, client):
            b = batcher(app, GNCNN)
            results = await asyncio.gather(*(b.submit({"image": x}, w) for x, w in zip(xs, wanted, strict=True)))
            for x, w, result in zip(xs, wanted, results, strict=True):
                assert result.batch_rows == sum(rows)
                ref = _alone(b.model, x, w)
                assert list(result.outputs) == list(ref)  # exactly the outputs asked for, in that order
                for name in ref:
                    assert result.outputs[name].shape == ref[name].shape
                    np.testing.assert_allclose(result.outputs[name], ref[name], rtol=0, atol=1e-5)
            text = (await client.get("/metrics")).text
            assert metric(text, "normserve_batch_size_count", model="gncnn") == 1
            assert metric(text, "normserve_batch_size_sum", model="gncnn") == sum(rows)
            assert metric(text, "normserve_queue_duration_seconds_count", model="gncnn") == len(rows)
            assert metric(text, "normserve_queue_depth", model="gncnn") == 0

    _run(scenario())


@pytest.mark.parametrize(
    ("limits", "expected_runs"),
    [
        ({"max_batch_size": 2}, [2, 2, 1]),  # rows end a batch
        ({"max_batch_size": 8, "max_batch_pixels": 2 * 32 * 32}, [2, 2, 1]),  # pixels end a batch
        ({"max_batch_size": 8, "max_features_pixels": 2 * 32 * 32}, [2, 2, 1]),  # the classifier's default cap
        ({"max_batch_size": 8}, [5]),  # everything queued fits one run
    ],
)
def test_batch_limits_split_what_was_queued(
    settings_factory: SettingsFactory, limits: dict[str, int], expected_runs: list[int]
) -> None:
    settings = settings_factory(**limits, model_instances=1)
    xs = _images(1, *[(1, 3, 32, 32)] * 5)

    async def scenario() -> None:
        async with serving(settings) as (app, client):
            b = batcher(app, GNCNN)
            gate = ExecutorGate(app)
            tasks = [asyncio.create_task(b.submit({"image": x}, ["logits"])) for x in xs]
            await until(lambda: b.dispatched > 0, "the first batch was taken")  # it waits for the held thread
            gate.release()
            results: list[BatchResult] = await asyncio.gather(*tasks)
            assert [r.batch_rows for r in results] == [n for n in expected_runs for _ in range(n)]
            for x, r in zip(xs, results, strict=True):
                np.testing.assert_allclose(r.outputs["logits"], _alone(b.model, x, ["logits"])["logits"], atol=1e-5)
            text = (await client.get("/metrics")).text
            assert metric(text, "normserve_batch_size_count", model="gncnn") == len(expected_runs)

    _run(scenario())


def test_different_shapes_never_share_a_run(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(model_instances=1, max_batch_size=8)
    shapes = [(1, 3, 32, 32), (1, 3, 40, 24), (2, 3, 32, 32), (1, 3, 40, 24), (1, 3, 32, 32)]
    xs = _images(2, *shapes)

    async def scenario() -> None:
        async with serving(settings) as (app, client):
            b = batcher(app, GNCNN)
            gate = ExecutorGate(app)
            first = asyncio.create_task(b.submit({"image": _images(3, (1, 3, 32, 32))[0]}))
            await until(lambda: b.dispatched == 1, "the first request was taken into a batch")
            tasks = [asyncio.create_task(b.submit({"image": x}, ["logits", "p4"])) for x in xs]
            await until(lambda: b.queued == len(xs), "every request is queued behind the held thread")
            gate.release()
            assert (await first).batch_rows == 1
            results: list[BatchResult] = await asyncio.gather(*tasks)
            # 32x32: 1 + 2 + 1 rows in one run; 40x24: 1 + 1 in another.
            assert [r.batch_rows for r in results] == [4, 2, 4, 2, 4]
            for x, r in zip(xs, results, strict=True):
                ref = _alone(b.model, x, ["logits", "p4"])
                for name in ref:
                    assert r.outputs[name].shape == ref[name].shape
                    np.testing.assert_allclose(r.outputs[name], ref[name], atol=1e-5)
            text = (await client.get("/metrics")).text
            assert metric(text, "normserve_batch_size_count", model="gncnn") == 3
            assert metric(text, "normserve_batch_size_sum", model="gncnn") == 1 + 4 + 2

    _run(scenario())


def test_queue_delay_holds_the_oldest_request_for_company(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(model_instances=1, max_batch_size=2, max_queue_delay_ms=60_000)
    a, b_img = _images(4, (1, 3, 32, 32), (1, 3, 32, 32))

    async def scenario() -> None:
        async with serving(settings) as (app, _):
            b = batcher(app, GNCNN)
            first = asyncio.create_task(b.submit({"image": a}))
            await asyncio.sleep(0.05)
            assert not first.done() and b.queued == 1, "a lone request waits (up to the delay) for others"
            second = await b.submit({"image": b_img})
            assert second.batch_rows == (await first).batch_rows == 2

    _run(scenario())


def test_classify_requests_batch_through_http_and_record_state_for_the_access_log(
    settings_factory: SettingsFactory, tmp_path: Path
) -> None:
    """Concurrent /classify calls (images of different sizes, all resized to 32x32) share a run;
    `request.state` carries the model, version and executed batch size for outer middleware."""
    from PIL import Image

    pngs = []
    for i, size in enumerate([(12, 9), (40, 30), (32, 32)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", size, (40 * i, 200, 30)).save(path)
        pngs.append(path.read_bytes())
    seen: list[dict[str, Any]] = []

    class StateRecorder:  # what the access-log middleware will read
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await self.app(scope, receive, send)
            if scope["type"] == "http" and scope["path"] == "/classify":
                seen.append(dict(scope.get("state", {})))

    async def scenario() -> None:
        async with serving(settings_factory(model_instances=1), outer_middleware=StateRecorder) as (app, client):
            gate = ExecutorGate(app)
            b = batcher(app, GNCNN)
            first = asyncio.create_task(b.submit({"image": np.zeros((1, 3, 32, 32), np.float32)}))
            await until(lambda: b.dispatched == 1, "a first request occupies the batcher")
            posts = [
                asyncio.create_task(client.post("/classify", content=p, headers={"content-type": "image/png"}))
                for p in pngs
            ]
            await until(lambda: b.queued == len(pngs), "all three requests are queued")
            gate.release()
            answers = await asyncio.gather(*posts)
            assert (await first).batch_rows == 1
            assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
            for png, r in zip(pngs, answers, strict=True):  # each got its own image's answer
                alone = await client.post("/classify", content=png, headers={"content-type": "image/png"})
                got = [(p["index"], p["probability"]) for p in r.json()["predictions"]]
                want = [(p["index"], p["probability"]) for p in alone.json()["predictions"]]
                assert [i for i, _ in got] == [i for i, _ in want]
                np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-5)
        assert [(s["model"], s["model_version"], s["batch_size"]) for s in seen[:3]] == [
            ("gncnn", shipped.GNCNN, 3)
        ] * 3
        assert [s["batch_size"] for s in seen[3:]] == [1, 1, 1]

    _run(scenario())


def test_v2_request_over_max_batch_size_is_400(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(model_instances=1, max_batch_size=4)
    x = _images(5, (5, 3, 8, 8))[0]

    async def scenario() -> None:
        async with serving(settings) as (_, client):
            r = await client.post("/v2/models/gncnn/infer", json=v2_request(x))
            assert r.status_code == 400
            assert "batch of 5 rows exceeds max_batch_size 4" in r.json()["error"]
            ok = await client.post("/v2/models/gncnn/infer", json=v2_request(x[:4]))
            assert ok.status_code == 200

    _run(scenario())


def test_config_json_overrides_the_batching_settings(settings_factory: SettingsFactory, repo_copy: Path) -> None:
    import json

    path = repo_copy / "gncnn" / shipped.GNCNN / "config.json"
    config = json.loads(path.read_text())
    config["dynamic_batching"] = {"max_batch_size": 3, "max_queue_size": 7}
    path.write_text(json.dumps(config))
    settings = settings_factory(
        repo_copy, model_instances=1, max_batch_size=16, max_queue_size=64, max_queue_delay_ms=2.5
    )

    async def scenario() -> None:
        async with serving(settings) as (app, client):
            own, other = batcher(app, GNCNN).policy, batcher(app, f"in_autoencoder/{shipped.DENOISER}").policy
            assert (own.max_batch_size, own.max_queue_size, own.max_queue_delay_ms) == (3, 7, 2.5)
            assert (other.max_batch_size, other.max_queue_size, other.max_queue_delay_ms) == (16, 64, 2.5)
            # Joined batches are capped at the largest run each model's route makes alone.
            assert (own.max_batch_pixels, other.max_batch_pixels) == (
                settings.max_features_pixels,
                min(settings.max_reconstruct_pixels, settings.reconstruct_tile**2 * settings.reconstruct_tile_batch),
            )
            r = await client.post("/v2/models/gncnn/infer", json=v2_request(np.zeros((4, 3, 8, 8), np.float32)))
            assert r.status_code == 400 and "max_batch_size 3" in r.json()["error"]

    _run(scenario())


def test_shutdown_runs_what_is_queued_and_refuses_new_work(settings_factory: SettingsFactory) -> None:
    xs = _images(6, *[(1, 3, 32, 32)] * 3)

    async def scenario() -> None:
        running = serving(settings_factory(model_instances=1))
        app, client = await running.__aenter__()
        b = batcher(app, GNCNN)
        refs = [_alone(b.model, x, ["logits"])["logits"] for x in xs]  # before the model stops
        gate = ExecutorGate(app)
        first = asyncio.create_task(b.submit({"image": xs[0]}))
        await until(lambda: b.dispatched == 1, "a first request occupies the batcher")
        posts = [asyncio.create_task(client.post("/v2/models/gncnn/infer", json=v2_request(x))) for x in xs]
        await until(lambda: b.queued == len(xs), "requests are queued")
        shutdown = asyncio.create_task(running.__aexit__(None, None, None))
        await until(lambda: b.closing, "shutdown has begun")
        with pytest.raises(ModelNotReady, match="shutting down"):
            await b.submit({"image": xs[0]})
        gate.release()
        answers = await asyncio.gather(*posts)
        await shutdown
        assert (await first).batch_rows == 1
        assert [r.status_code for r in answers] == [200] * 3
        for ref, r in zip(refs, answers, strict=True):
            logits = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, 10)
            np.testing.assert_allclose(logits, ref, atol=1e-5)

    _run(scenario())


def test_two_instances_run_two_batches_at_once_and_gather_the_next_when_one_is_free(
    settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_factory(model_instances=2, max_batch_size=8)
    xs = _images(5, *[(1, 3, 32, 32)] * 4)

    async def scenario() -> None:
        async with serving(settings) as (app, client):
            b = batcher(app, GNCNN)
            assert b.policy.instances == 2
            refs = [_alone(b.model, x, ["logits"]) for x in xs]
            # The first two runs each wait at this barrier until the other one has started:
            # if the batcher ran one batch at a time, the barrier would time out and they fail.
            both_running = threading.Barrier(2, timeout=10)
            predict = b.model.predict
            calls = []

            def meeting_predict(
                inputs: dict[str, np.ndarray], outputs: list[str] | None, **kwargs: Any
            ) -> dict[str, np.ndarray]:
                calls.append(threading.current_thread().name)
                if len(calls) <= 2:
                    both_running.wait()
                return predict(inputs, outputs, **kwargs)

            monkeypatch.setattr(b.model, "predict", meeting_predict)
            gate = ExecutorGate(app)
            first = []
            for n, x in enumerate(xs[:2], start=1):
                first.append(asyncio.create_task(b.submit({"image": x}, ["logits"])))
                await until(lambda n=n: b.dispatched == n and b.queued == 0, f"batch {n} went to an instance")
            rest = [asyncio.create_task(b.submit({"image": x}, ["logits"])) for x in xs[2:]]
            await until(lambda: b.queued == 2, "later requests wait for a free instance")
            gate.release()
            results: list[BatchResult] = await asyncio.gather(*first, *rest)
            # The two held-back requests joined one batch when an instance came free.
            assert [r.batch_rows for r in results] == [1, 1, 2, 2]
            assert len(calls) == 3 and len(set(calls[:2])) == 2, f"runs on threads {calls}"
            for r, ref in zip(results, refs, strict=True):
                np.testing.assert_allclose(r.outputs["logits"], ref["logits"], atol=1e-5)
            text = (await client.get("/metrics")).text
            assert metric(text, "normserve_batch_size_sum", model="gncnn") == 4

    _run(scenario())


def test_shutdown_with_two_instances_finishes_both_running_batches(settings_factory: SettingsFactory) -> None:
    xs = _images(6, *[(1, 3, 32, 32)] * 3)

    async def scenario() -> None:
        running = serving(settings_factory(model_instances=2, max_batch_size=1))
        app, _ = await running.__aenter__()
        b = batcher(app, GNCNN)
        gate = ExecutorGate(app)
        tasks = []
        for n, x in enumerate(xs, start=1):
            tasks.append(asyncio.create_task(b.submit({"image": x}, ["logits"])))
            await until(lambda n=n: b.dispatched + b.queued == n, f"request {n} arrived")
        assert (b.dispatched, b.queued) == (2, 1), "two run, one waits"
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done(), "stop waits for the batches in flight"
        with pytest.raises(ModelNotReady):
            await b.submit({"image": xs[0]})
        gate.release()
        await stopping
        results = await asyncio.gather(*tasks)
        assert [r.outputs["logits"].shape for r in results] == [(1, 10)] * 3
        await running.__aexit__(None, None, None)

    _run(scenario())


def test_the_batcher_keeps_no_batch_alive_between_runs(settings_factory: SettingsFactory) -> None:
    """Once a batch is answered, the batcher's loop holds neither its inputs nor its answers (views
    of ORT's arena, which the idle trim cannot give back while any is alive; issue 26)."""

    async def scenario() -> None:
        async with serving(settings_factory()) as (app, _):
            b = batcher(app, GNCNN)
            (x,) = _images(7, (1, 3, 32, 32))
            result = await b.submit({"image": x}, None)
            refs = [weakref.ref(x), *(weakref.ref(a) for a in result.outputs.values())]
            del x, result
            await asyncio.sleep(0.05)  # the loop goes back to waiting for the next request
            gc.collect()
            assert [r() for r in refs] == [None] * len(refs)

    _run(scenario())


def test_a_caller_leaving_after_its_batch_started_costs_no_repr(
    settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request cancelled once its batch was taken off the queue (a client that went away) is
    forgotten without looking for it in the queue: never formatted (a request's repr prints
    every array of its batch, milliseconds of the event loop); one still queued is removed."""
    from normserve.service import batching

    def no_repr(self: object) -> str:
        raise AssertionError("a pending request was formatted")

    monkeypatch.setattr(batching._Pending, "__repr__", no_repr)
    settings = settings_factory(model_instances=1, max_batch_size=2)
    xs = _images(9, *[(1, 3, 32, 32)] * 3)

    async def scenario() -> None:
        async with serving(settings) as (app, client):
            b = batcher(app, GNCNN)
            gate = ExecutorGate(app)
            running = [asyncio.create_task(b.submit({"image": x}, ["logits"])) for x in xs[:2]]
            await until(lambda: b.dispatched == 2 and b.queued == 0, "the first batch went to the instance")
            waiting = asyncio.create_task(b.submit({"image": xs[2]}, ["logits"]))
            await until(lambda: b.queued == 1, "the third request is queued")
            running[0].cancel()  # taken into the running batch
            waiting.cancel()  # still queued
            left = await asyncio.gather(running[0], waiting, return_exceptions=True)
            assert all(isinstance(e, asyncio.CancelledError) for e in left), left
            assert b.queued == 0
            gate.release()
            result: BatchResult = await running[1]
            assert result.batch_rows == 1  # the run skipped the row of the caller that left
            text = (await client.get("/metrics")).text
            assert metric(text, "normserve_queue_depth", model="gncnn") == 0

    _run(scenario())


SHRINK = "memory.enable_memory_arena_shrinkage"


@pytest.mark.parametrize(
    ("rows", "shrinks"),
    [
        ((1,), False),  # one 512² image
        ((1, 1), False),  # two 512² images in one run: /reconstruct 512² at c=4
        ((2,), True),  # one request of two 512² rows: a tile batch of a large image
        ((1, 1, 1), True),  # more than two 512² images
    ],
)
def test_runs_joined_from_512_images_keep_their_arena(
    settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch, rows: tuple[int, ...], shrinks: bool
) -> None:
    """A run of up to two 512² images keeps its session's arena for the next run, which would
    otherwise fault its activations in again (the idle trim gives it back later); a tile batch of
    one large image, or a larger run, asks ORT to shrink the arena when it ends."""
    from normserve.service import batching

    assert (batching.KEEP_ARENA_PIXELS, batching.KEEP_ARENA_REQUEST_PIXELS) == (2 * 512 * 512, 512 * 512)
    seen: list[tuple[int, bool]] = []
    predict = ServedModel.predict

    def spy(self: ServedModel, inputs: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        options = kwargs.get("run_options")
        try:
            shrink = options is not None and options.get_run_config_entry(SHRINK) == "cpu:0"
        except RuntimeError:  # not set
            shrink = False
        seen.append((next(iter(inputs.values())).shape[0], shrink))
        return predict(self, inputs, *args, **kwargs)

    monkeypatch.setattr(ServedModel, "predict", spy)
    settings = settings_factory(model_instances=1, max_batch_size=4, max_batch_pixels=4 * 512 * 512)
    xs = _images(11, *[(n, 3, 512, 512) for n in rows])

    async def scenario() -> None:
        async with serving(settings) as (app, _):
            b = batcher(app, f"in_autoencoder/{shipped.DENOISER}")
            gate = ExecutorGate(app)
            tasks = [asyncio.create_task(b.submit({"image": x}, None)) for x in xs]
            await until(lambda: b.dispatched == len(xs), "every request is in the one batch")
            gate.release()
            results: list[BatchResult] = await asyncio.gather(*tasks)
            assert [r.batch_rows for r in results] == [sum(rows)] * len(rows)

    _run(scenario())
    assert seen[-1] == (sum(rows), shrinks)
