"""Open Inference Protocol v2 health, readiness and metadata on a healthy app: the committed
model repository, loaded by the real lifespan."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import shipped
from fastapi.testclient import TestClient

ErrorCheck = Callable[..., str]  # the expect_error fixture
MODELS = ["gncnn", "in_autoencoder"]


def test_live(client: TestClient) -> None:
    response = client.get("/v2/health/live")
    assert response.status_code == 200
    assert response.json() == {"live": True}


def test_server_ready_lists_every_model_ready(client: TestClient, committed_model_repository: Path) -> None:
    response = client.get("/v2/health/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True
    # Every <model>/<version> folder on disk is listed, each READY with no reason.
    on_disk = sorted(f"{v.parent.name}/{v.name}" for v in committed_model_repository.glob("*/*") if v.is_dir())
    assert sorted(f"{m['name']}/{m['version']}" for m in body["models"]) == on_disk
    for model in body["models"]:
        assert (model["ready"], model["state"], model["reason"]) == (True, "READY", ""), model


# (model, version asked for): None = the unversioned route, which answers for the newest version.
VERSIONS = [(name, version) for name in MODELS for version in [None, *shipped.versions(name)]]


def _path(name: str, version: str | None, suffix: str = "") -> str:
    return f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + suffix


@pytest.mark.parametrize(("name", "version"), VERSIONS)
def test_model_ready(client: TestClient, name: str, version: str | None) -> None:
    response = client.get(_path(name, version, "/ready"))
    assert response.status_code == 200
    expected = version or shipped.newest(name)
    assert response.json() == {"name": name, "version": expected, "ready": True, "state": "READY", "reason": ""}


@pytest.mark.parametrize(("name", "version"), VERSIONS)
def test_model_metadata(client: TestClient, name: str, version: str | None) -> None:
    response = client.get(_path(name, version))
    assert response.status_code == 200, response.text
    body = response.json()
    config = shipped.config(name, version)
    assert body["name"] == name
    assert body["versions"] == shipped.versions(name)
    assert body["platform"] == "onnxruntime_onnx"
    assert body["task"] == config["task"]
    # What config.json records (false for the committed random-init weights): never advertised otherwise.
    assert body["trained"] is config["weights"]["trained"]
    assert body["execution_provider"] == "CPUExecutionProvider"
    assert body["labels"] == config["labels"]
    assert body["inputs"] == config["inputs"]
    assert body["outputs"] == config["outputs"]


@pytest.mark.parametrize("name", MODELS)
def test_metadata_marks_dynamic_dims_with_minus_one(client: TestClient, name: str) -> None:
    body = client.get(f"/v2/models/{name}").json()
    (image,) = body["inputs"]
    assert image["datatype"] == "FP32"
    assert image["shape"] == [-1, 3, -1, -1]  # batch, height and width are dynamic; channels are not
    for output in body["outputs"]:
        assert output["shape"][0] == -1
        assert all(d == -1 or d > 0 for d in output["shape"])


def test_classifier_metadata_matches_its_heads(client: TestClient) -> None:
    config = shipped.config("gncnn")
    outputs = {o["name"]: o["shape"] for o in client.get("/v2/models/gncnn").json()["outputs"]}
    assert outputs["logits"] == [-1, len(config["labels"])]  # one logit per label
    assert {lv["output"]: lv["channels"] for lv in config["feature_info"]} == {
        name: shape[1] for name, shape in outputs.items() if name != "logits"
    }


def test_server_metadata(client: TestClient) -> None:
    response = client.get("/v2")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "normserve"
    try:
        expected = version("normserve")
    except PackageNotFoundError:  # running from a checkout that was never installed
        expected = "0+unknown"
    assert body["version"] == expected
    assert isinstance(body["extensions"], list) and all(isinstance(e, str) for e in body["extensions"])


@pytest.mark.parametrize(
    ("path", "fragments"),
    [
        ("/v2/models/nope", ("'nope'", "gncnn")),
        ("/v2/models/nope/ready", ("'nope'",)),
        ("/v2/models/nope/versions/1", ("'nope'",)),
        ("/v2/models/nope/versions/1/ready", ("'nope'",)),
        ("/v2/models/gncnn/versions/9", ("no version '9'",)),
        ("/v2/models/gncnn/versions/9/ready", ("no version '9'",)),
        ("/v2/models/in_autoencoder/versions/latest/ready", ("no version 'latest'",)),
    ],
)
def test_unknown_model_or_version_is_404(
    client: TestClient, expect_error: ErrorCheck, path: str, fragments: tuple[str, ...]
) -> None:
    expect_error(client.get(path), 404, *fragments)
