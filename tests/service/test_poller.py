"""Repository polling (NORMSERVE_REPOSITORY_POLL_S, service/poller.py): versions added, rewritten,
broken and removed on disk while a real app serves; and under load, over a socket, with two
workers."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import ClientFactory, ErrorCheck
from fastapi.testclient import TestClient
from images import png
from inprocess import batchers, metric
from repo_layout import add_version, replace_file, single_version
from servers import running_server

from normserve.service.state import server_state

POLL_S = 0.05


@pytest.fixture
def repo_copy(repo_copy: Path) -> Path:
    return single_version(repo_copy)


def rescans(client: TestClient, count: int = 2, timeout_s: float = 30.0) -> None:
    """Wait until the app's poller has completed `count` more rescans (one may have been under
    way when the repository changed)."""
    poller = server_state(client.app).poller
    target = poller.polls + count
    deadline = time.monotonic() + timeout_s
    while poller.polls < target:
        assert time.monotonic() < deadline, f"the poller did not rescan {count} times in {timeout_s} s"
        time.sleep(0.01)


def classify(client: TestClient | httpx.Client, query: str = "") -> Any:
    return client.post(f"/classify{query}", content=png(16, 16), headers={"content-type": "image/png"})


def versions(client: TestClient) -> list[tuple[str, str, str]]:
    return [(r["name"], r["version"], r["state"]) for r in client.post("/v2/repository/index").json()]


def infer(client: TestClient, model: str, x: np.ndarray, output: str = "logits") -> np.ndarray:
    body = {
        "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        "outputs": [{"name": output}],
    }
    response = client.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def test_a_new_version_and_a_new_model_serve_after_a_rescan(app_client: ClientFactory, repo_copy: Path) -> None:
    client = app_client(repo_copy, repository_poll_s=POLL_S, version_policy="all")
    assert classify(client).json()["version"] == "1"
    add_version(repo_copy, "gncnn", "2", atomic=True)
    shutil.copytree(repo_copy / "in_autoencoder", repo_copy / ".denoiser_b")
    (repo_copy / ".denoiser_b").rename(repo_copy / "denoiser_b")
    for d in (repo_copy / "denoiser_b").iterdir():
        replace_file(
            d / "config.json", (d / "config.json").read_text().replace('"in_autoencoder"', '"denoiser_b"').encode()
        )
    rescans(client)

    assert classify(client).json()["version"] == "2"  # the newest serves requests that name none
    assert classify(client, "?version=1").json()["version"] == "1"
    assert ("gncnn", "2", "READY") in versions(client) and ("denoiser_b", "1", "READY") in versions(client)
    names = [name for name, _, _ in versions(client)]
    assert names == sorted(names)  # the new model is listed in name order, not last
    ready = [m["name"] for m in client.get("/v2/health/ready").json()["models"]]
    assert ready == sorted(ready)
    assert client.get("/v2/models/denoiser_b/ready").status_code == 200
    assert client.get("/v2/health/ready").json()["ready"] is True
    x = np.random.default_rng(0).random((1, 3, 24, 24), dtype=np.float32)
    np.testing.assert_array_equal(
        infer(client, "denoiser_b", x, "reconstruction"), infer(client, "in_autoencoder", x, "reconstruction")
    )
    assert metric(client.get("/metrics").text, "normserve_model_ready", model="gncnn", version="2") == 1


def test_a_removed_version_is_retired(app_client: ClientFactory, repo_copy: Path, expect_error: ErrorCheck) -> None:
    add_version(repo_copy, "gncnn", "2")
    client = app_client(repo_copy, repository_poll_s=POLL_S)
    assert classify(client).json()["version"] == "2"
    shutil.rmtree(repo_copy / "gncnn" / "2")
    rescans(client)

    assert classify(client).json()["version"] == "1"
    expect_error(classify(client, "?version=2"), 404, "no version '2'", "['1']")
    assert [v for n, v, _ in versions(client) if n == "gncnn"] == ["1"]
    assert metric(client.get("/metrics").text, "normserve_model_ready", model="gncnn", version="2") == 0
    assert "gncnn/2" not in batchers(client.app)


def test_a_rewritten_version_is_loaded_again(
    app_client: ClientFactory, repo_copy: Path, committed_model_repository: Path
) -> None:
    # Version 1 is the shipped classifier; its graph is overwritten with the untrained version 1 of
    # the committed repository: same inputs and outputs, other weights.
    client = app_client(repo_copy, repository_poll_s=POLL_S)
    x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    before = infer(client, "gncnn", x)
    other = committed_model_repository / "gncnn" / "1" / "model.onnx"
    replace_file(repo_copy / "gncnn" / "1" / "model.onnx", other.read_bytes())
    rescans(client)

    expected = ort.InferenceSession(str(other), providers=["CPUExecutionProvider"]).run(["logits"], {"image": x})[0]
    after = infer(client, "gncnn", x)
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(after, before, atol=1e-3)
    assert [(n, v) for n, v, _ in versions(client) if n == "gncnn"] == [("gncnn", "1")]


@pytest.mark.parametrize("fault", ["garbage-graph", "config-not-json"])
def test_a_broken_version_never_replaces_the_serving_one(
    app_client: ClientFactory, repo_copy: Path, expect_error: ErrorCheck, fault: str
) -> None:
    client = app_client(repo_copy, repository_poll_s=POLL_S, version_policy="latest:1")
    name = "model.onnx" if fault == "garbage-graph" else "config.json"
    original = (repo_copy / "gncnn" / "1" / name).read_bytes()
    if name == "config.json":
        original = original.replace(b'"version": "1"', b'"version": "2"')
    good = add_version(repo_copy, "gncnn", "2", atomic=True, edit=lambda d: (d / name).write_bytes(b"not it"))
    rescans(client)

    # Version 1 keeps serving; version 2 is listed with why it is not.
    assert classify(client).json()["version"] == "1"
    assert client.get("/v2/health/ready").status_code == 200
    index = {r["version"]: r for r in client.post("/v2/repository/index").json() if r["name"] == "gncnn"}
    assert (index["2"]["state"], index["2"]["ready"]) == ("UNAVAILABLE", False)
    assert index["2"]["reason"].startswith("not loaded: failed to load")
    expect_error(classify(client, "?version=2"), 404, "version '2' is in the repository but not loaded: failed to load")

    # Fixed on disk: it loads, and latest:1 retires version 1.
    replace_file(good / name, original)
    rescans(client)
    assert classify(client).json()["version"] == "2"
    expect_error(classify(client, "?version=1"), 404, "not loaded: version policy latest:1")

    # A rewrite of the serving version that fails to load leaves its old files serving.
    replace_file(good / "model.onnx", b"garbage again")
    rescans(client)
    assert classify(client).json()["version"] == "2"
    assert client.get("/v2/models/gncnn/versions/2/ready").status_code == 200


def test_without_polling_the_repository_is_read_once(app_client: ClientFactory, repo_copy: Path) -> None:
    client = app_client(repo_copy)  # NORMSERVE_REPOSITORY_POLL_S defaults to 0
    add_version(repo_copy, "gncnn", "2")
    time.sleep(0.3)
    assert server_state(client.app).poller.polls == 0
    assert classify(client).json()["version"] == "1"
    assert ("gncnn", "2", "READY") not in versions(client)


@pytest.mark.e2e
def test_no_request_fails_while_versions_come_and_go(tmp_path: Path, committed_model_repository: Path) -> None:
    """Two worker processes, a client hammering /classify from 4 threads, and new versions
    arriving under latest:1 (each retiring the one before): every request is answered 200, and
    both workers end on the newest version."""
    repo = single_version(shutil.copytree(committed_model_repository, tmp_path / "model_repository"))
    env = {"NORMSERVE_REPOSITORY_POLL_S": "0.2", "NORMSERVE_VERSION_POLICY": "latest:1", "NORMSERVE_WORKERS": "2"}
    with running_server(tmp_path / "server.log", "--model-repository", str(repo), env=env) as server:
        stop = threading.Event()
        answers: Counter[tuple[int, str]] = Counter()
        lock = threading.Lock()

        def hammer() -> None:
            with httpx.Client(base_url=server.base_url, timeout=30) as http:
                while not stop.is_set():
                    response = classify(http)
                    key = (response.status_code, response.json().get("version", response.text))
                    with lock:
                        answers[key] += 1

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for version in ("2", "3", "4"):
                time.sleep(1.0)
                add_version(repo, "gncnn", version, atomic=True)
            deadline = time.monotonic() + 30
            with httpx.Client(base_url=server.base_url, timeout=30) as http:
                while time.monotonic() < deadline:
                    if {classify(http).json()["version"] for _ in range(20)} == {"4"}:
                        break
                    time.sleep(0.2)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        failures = {k: n for k, n in answers.items() if k[0] != 200}
        assert not failures, f"{failures}\n{server.log_text()[-3000:]}"
        assert {v for _, v in answers} >= {"1", "4"}, answers
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            assert {classify(http).json()["version"] for _ in range(40)} == {"4"}  # both workers moved on
        assert "gncnn: now serving ['4']" in server.log_text()


def test_a_removed_model_folder_and_a_removed_specific_version(
    app_client: ClientFactory, repo_copy: Path, expect_error: ErrorCheck
) -> None:
    # specific:1,2 at start-up; version 2 then disappears (not an error while serving: the
    # policy serves what is left of its list), and so does the whole denoiser folder.
    add_version(repo_copy, "gncnn", "2")
    client = app_client(repo_copy, repository_poll_s=POLL_S, version_policies={"gncnn": "specific:1,2"})
    assert classify(client).json()["version"] == "2"
    shutil.rmtree(repo_copy / "gncnn" / "2")
    shutil.rmtree(repo_copy / "in_autoencoder")
    rescans(client)

    assert classify(client).json()["version"] == "1"
    expect_error(
        client.post("/reconstruct", content=png(16, 16), headers={"content-type": "image/png"}),
        404,
        "'in_autoencoder' not found",
    )
    assert [(n, v) for n, v, _ in versions(client)] == [("gncnn", "1")]
    assert client.get("/v2/health/ready").json()["ready"] is True  # what is left is ready
    assert "in_autoencoder/1" not in batchers(client.app)
