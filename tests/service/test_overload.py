"""Overload, deadlines and faults: a full queue answers 503 with Retry-After at once; a request
past its deadline answers 504 (never run if it was still queued, result dropped if it was
running); an ONNX Runtime error answers 500 for the callers of that run only, is counted, and the
server keeps serving."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shipped
from conftest import ErrorCheck, SettingsFactory
from fastapi.testclient import TestClient
from inprocess import ExecutorGate, batcher, metric, serving, until, v2_request
from onnx_models import write_fault_model

from normserve.service.app import create_app
from normserve.service.errors import RequestTimeout

GNCNN = f"gncnn/{shipped.GNCNN}"
X = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 16), (10, 120, 240)).save(buf, format="PNG")
    return buf.getvalue()


# name -> (path, the route template the metrics label it with, request arguments)
ROUTES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "v2 infer": ("/v2/models/gncnn/infer", "/v2/models/{name}/infer", {"json": v2_request(X)}),
    "classify": ("/classify", "/classify", {"content": _png(), "headers": {"content-type": "image/png"}}),
}


@pytest.mark.parametrize("route", ROUTES)
def test_full_queue_answers_503_with_retry_after_at_once(
    settings_factory: SettingsFactory, expect_error: ErrorCheck, route: str
) -> None:
    path, endpoint, kwargs = ROUTES[route]

    async def scenario() -> None:
        async with serving(settings_factory(model_instances=1, max_queue_size=2)) as (app, client):
            b = batcher(app, GNCNN)
            gate = ExecutorGate(app)
            first = asyncio.create_task(b.submit({"image": X}))
            await until(lambda: b.dispatched == 1, "a first request occupies the batcher")
            queued = [asyncio.create_task(client.post(path, **kwargs)) for _ in range(2)]
            await until(lambda: b.queued == 2, "the queue is full")
            refused = await client.post(path, **kwargs)
            # Answered while the inference thread is still held: it did not wait for the queue.
            assert not first.done() and b.queued == 2
            expect_error(refused, 503, "overloaded", "max_queue_size 2")
            assert refused.headers["retry-after"] == "1"
            gate.release()
            assert [r.status_code for r in await asyncio.gather(*queued)] == [200, 200]
            await first
            text = (await client.get("/metrics")).text
            assert metric(text, "normserve_failures_total", endpoint=endpoint, reason="Overloaded") == 1
            assert metric(text, "normserve_queue_depth", model="gncnn") == 0

    asyncio.run(scenario())


def test_request_still_queued_at_its_deadline_is_504_and_never_runs(
    settings_factory: SettingsFactory, expect_error: ErrorCheck
) -> None:
    async def scenario() -> None:
        async with serving(settings_factory(model_instances=1, request_timeout_s=0.3)) as (app, client):
            b = batcher(app, GNCNN)
            gate = ExecutorGate(app)
            # Taken into a batch, but the batch waits for the held thread: it has not started.
            first = asyncio.create_task(b.submit({"image": X}))
            await until(lambda: b.dispatched == 1, "a first request occupies the batcher")
            r = await client.post("/v2/models/gncnn/infer", json=v2_request(X))
            expect_error(r, 504, "within 0.3 s", "still queued and was not run")
            with pytest.raises(RequestTimeout, match="was not run"):
                await first
            assert b.queued == 0, "the timed-out request left the queue"
            gate.release()
            await until(lambda: b.dispatched == 0, "the abandoned batch is done")
            text = (await client.get("/metrics")).text
            assert metric(text, "normserve_batch_size_count", model="gncnn") == 0, "nothing ran"
            assert metric(text, "normserve_compute_duration_seconds_count", model="gncnn") == 0
            assert metric(text, "normserve_queue_depth", model="gncnn") == 0
            assert metric(text, "normserve_failures_total", reason="RequestTimeout") == 1
            ok = await client.post("/v2/models/gncnn/infer", json=v2_request(X))
            assert ok.status_code == 200
            text = (await client.get("/metrics")).text
            assert metric(text, "normserve_batch_size_count", model="gncnn") == 1

    asyncio.run(scenario())


def test_request_running_at_its_deadline_is_504_and_its_result_dropped(
    settings_factory: SettingsFactory, expect_error: ErrorCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with serving(settings_factory(model_instances=1, request_timeout_s=0.3)) as (app, client):
            b = batcher(app, GNCNN)
            model = b.model
            predict, started, finish = model.predict, threading.Event(), threading.Event()

            def slow_predict(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
                started.set()
                finish.wait(30)
                return predict(*args, **kwargs)

            monkeypatch.setattr(model, "predict", slow_predict)
            r = await client.post("/v2/models/gncnn/infer", json=v2_request(X))
            assert started.is_set()
            expect_error(r, 504, "its result is dropped")
            finish.set()
            await until(lambda: b.dispatched == 0, "the run is over")
            text = (await client.get("/metrics")).text
            assert metric(text, "normserve_batch_size_count", model="gncnn") == 1, "it did run"
            ok = await client.post("/v2/models/gncnn/infer", json=v2_request(X))
            assert ok.status_code == 200

    asyncio.run(scenario())


@pytest.fixture
def fault_repository(tmp_path: Path) -> Path:
    repository = tmp_path / "repo"
    write_fault_model(repository)
    return repository


def _fault_request(side: int, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    x = np.random.default_rng(seed).random((1, 3, side, side), dtype=np.float32)
    return x, v2_request(x)


def test_ort_runtime_error_is_500_counted_and_the_server_keeps_serving(
    settings_factory: SettingsFactory, fault_repository: Path, expect_error: ErrorCheck
) -> None:
    with TestClient(
        create_app(settings_factory(fault_repository, model_instances=1)), raise_server_exceptions=False
    ) as client:
        _, bad = _fault_request(7)  # 147 elements: the Reshape fails inside ONNX Runtime
        r = client.post("/v2/models/fault/infer", json=bad)
        message = expect_error(r, 500, "model fault/1 failed", "cannot be reshaped")
        assert "Traceback" not in message
        x, good = _fault_request(8)
        ok = client.post("/v2/models/fault/infer", json=good)
        assert ok.status_code == 200, ok.text
        out = ok.json()["outputs"][0]
        assert out["shape"] == [1, 3, 8, 8]
        np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(x.shape), x)
        assert client.get("/v2/health/ready").status_code == 200
        text = client.get("/metrics").text
    infer = "/v2/models/{name}/infer"
    assert metric(text, "normserve_failures_total", endpoint=infer, reason="InferenceError") == 1
    assert metric(text, "normserve_requests_total", endpoint=infer, model="fault", status="500") == 1
    assert metric(text, "normserve_requests_total", endpoint=infer, model="fault", status="200") == 1


def test_a_failing_run_fails_only_its_own_callers(settings_factory: SettingsFactory, fault_repository: Path) -> None:
    async def scenario() -> None:
        async with serving(settings_factory(fault_repository, model_instances=1)) as (app, client):
            b = batcher(app, "fault/1")
            gate = ExecutorGate(app)
            first = asyncio.create_task(b.submit({"image": _fault_request(8)[0]}))
            await until(lambda: b.dispatched == 1, "a first request occupies the batcher")
            sides = [7, 8, 7, 8]  # the 7x7 pair shares one failing run, the 8x8 pair another
            requests = [_fault_request(side, seed) for seed, side in enumerate(sides)]
            posts = [asyncio.create_task(client.post("/v2/models/fault/infer", json=body)) for _, body in requests]
            await until(lambda: b.queued == len(sides), "all requests are queued")
            gate.release()
            answers = await asyncio.gather(*posts)
            assert [r.status_code for r in answers] == [500, 200, 500, 200]
            for (x, _), side, r in zip(requests, sides, answers, strict=True):
                if side == 8:
                    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(x.shape)
                    np.testing.assert_array_equal(got, x)  # its own rows, exactly
                else:
                    assert set(r.json()) == {"error"} and "failed" in r.json()["error"]
            assert (await first).batch_rows == 1
            text = (await client.get("/metrics")).text
            assert metric(text, "normserve_failures_total", reason="InferenceError") == 2
            assert metric(text, "normserve_batch_size_count", model="fault") == 3  # first, the 7x7 pair, the 8x8 pair
            again = await client.post("/v2/models/fault/infer", json=_fault_request(8)[1])
            assert again.status_code == 200

    asyncio.run(scenario())


def test_model_with_a_fixed_batch_dimension_runs_each_request_alone(
    settings_factory: SettingsFactory, tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    version_dir = write_fault_model(repository, "fixed", batch_dim=1)
    assert json.loads((version_dir / "config.json").read_text())["inputs"][0]["shape"][0] == 1

    async def scenario() -> None:
        async with serving(settings_factory(repository, model_instances=1)) as (app, client):
            b = batcher(app, "fixed/1")
            assert b.policy.max_batch_size == 0
            gate = ExecutorGate(app)
            xs = [_fault_request(8, seed)[0] for seed in range(3)]
            tasks = [asyncio.create_task(b.submit({"image": x})) for x in xs]
            await until(lambda: b.dispatched == 1 and b.queued == 2, "one runs, two wait")
            gate.release()
            results = await asyncio.gather(*tasks)
            assert [r.batch_rows for r in results] == [1, 1, 1]
            for x, r in zip(xs, results, strict=True):
                np.testing.assert_array_equal(r.outputs["reconstruction"], x)
            config = (await client.get("/v2/models/fixed/config")).json()
            assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
            assert config["input"][0]["dims"] == [1, 3, -1, -1]

    asyncio.run(scenario())
