"""The model repository under faults and with several versions: a copy of the committed
repository is broken or extended on disk, then served by a real app. One broken model must not
take the server down; readiness must say which model is broken and why."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from images import png
from repo_layout import add_version, edit_config, single_version

ClientFactory = Callable[..., TestClient]  # the app_client fixture
ErrorCheck = Callable[..., str]  # the expect_error fixture
Fault = Callable[[Path], None]


@pytest.fixture
def repo_copy(repo_copy: Path) -> Path:
    """The committed repository reduced to one version per model, its newest, renumbered "1"."""
    return single_version(repo_copy)


def post_png(client: TestClient, url: str) -> Any:
    return client.post(url, content=png(16, 16), headers={"content-type": "image/png"})


# -- one broken model ------------------------------------------------------------------------

# Each fault breaks gncnn/1 on disk; fragments are what its not-ready reason must mention.
FAULTS: dict[str, tuple[Fault, tuple[str, ...]]] = {
    "garbage-onnx": (
        lambda d: (d / "model.onnx").write_bytes(b"this is not a protobuf\x00\xff" * 64),
        ("failed to load", "protobuf"),
    ),
    "empty-onnx": (lambda d: (d / "model.onnx").write_bytes(b""), ("failed to load", "model.onnx")),
    "missing-onnx": (lambda d: (d / "model.onnx").unlink(), ("no model.onnx",)),
    "graph-of-another-model": (
        lambda d: shutil.copyfile(d.parents[1] / "in_autoencoder" / "1" / "model.onnx", d / "model.onnx"),
        ("failed to load", "differ from config.json"),
    ),
    "config-wrong-name": (lambda d: edit_config(d, name="resnet"), ("config.json names resnet/1", "gncnn/1")),
    "config-wrong-version": (lambda d: edit_config(d, version="3"), ("config.json names gncnn/3", "gncnn/1")),
    "config-unknown-field": (lambda d: edit_config(d, colour="blue"), ("failed to load", "colour")),
    "config-not-json": (lambda d: (d / "config.json").write_text("{ not json"), ("failed to load", "json")),
    "config-missing": (lambda d: (d / "config.json").unlink(), ("failed to load", "config.json")),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_broken_model_is_unavailable_and_the_rest_serves(
    app_client: ClientFactory, repo_copy: Path, expect_error: ErrorCheck, fault: str
) -> None:
    breaks, fragments = FAULTS[fault]
    breaks(repo_copy / "gncnn" / "1")
    client = app_client(repo_copy, allow_503=True)  # the app must start at all

    # The model's own readiness: 503, with a reason a human can act on.
    for path in ("/v2/models/gncnn/ready", "/v2/models/gncnn/versions/1/ready"):
        response = client.get(path)
        assert response.status_code == 503, response.text
        body = response.json()
        assert (body["name"], body["version"], body["ready"], body["state"]) == ("gncnn", "1", False, "UNAVAILABLE")
        for fragment in fragments:
            assert fragment.lower() in body["reason"].lower(), f"{fragment!r} not in reason {body['reason']!r}"
        assert str(repo_copy.parent) not in body["reason"]  # no server path in an unauthenticated answer
    for path in ("/v2/health/ready", "/v2/models", "/v2/models/gncnn/ready", "/classify"):
        answer = post_png(client, path) if path == "/classify" else client.get(path)
        assert str(repo_copy.parent) not in answer.text and str(repo_copy.resolve().parent) not in answer.text, path

    # Strict readiness: the server is not ready while one model is not, and says which.
    response = client.get("/v2/health/ready")
    assert response.status_code == 503
    states = {m["name"]: m["ready"] for m in response.json()["models"]}
    assert states == {"gncnn": False, "in_autoencoder": True}
    assert response.json()["ready"] is False

    # Requests for the broken model are 503 with the reason; its metadata too.
    message = expect_error(post_png(client, "/classify"), 503, "gncnn/1", "not ready")
    assert fragments[0].lower() in message.lower()
    expect_error(post_png(client, "/features"), 503, "gncnn/1")
    expect_error(client.get("/v2/models/gncnn"), 503, "gncnn/1")

    # The healthy model is untouched.
    assert client.get("/v2/models/in_autoencoder/ready").status_code == 200
    response = post_png(client, "/reconstruct")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert client.get("/v2/health/live").status_code == 200


def test_relaxed_readiness_is_ready_while_one_model_serves(app_client: ClientFactory, repo_copy: Path) -> None:
    """Relaxed readiness: ready while some model serves, but never while a model behind the
    image routes has no ready version (here the classifier: behind /classify unless renamed)."""
    (repo_copy / "gncnn" / "1" / "model.onnx").write_bytes(b"garbage")
    behind_routes = app_client(repo_copy, allow_503=True, strict_readiness=False)
    assert behind_routes.get("/v2/health/ready").status_code == 503
    client = app_client(repo_copy, allow_503=True, strict_readiness=False, classifier="another")
    response = client.get("/v2/health/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True
    # Still honest about the broken model.
    assert {m["name"]: m["state"] for m in body["models"]} == {"gncnn": "UNAVAILABLE", "in_autoencoder": "READY"}
    assert client.get("/v2/models/gncnn/ready").status_code == 503


@pytest.mark.parametrize("strict", [True, False])
def test_no_ready_model_is_never_ready(app_client: ClientFactory, repo_copy: Path, strict: bool) -> None:
    for model in ("gncnn", "in_autoencoder"):
        (repo_copy / model / "1" / "model.onnx").write_bytes(b"garbage")
    client = app_client(repo_copy, allow_503=True, strict_readiness=strict)
    response = client.get("/v2/health/ready")
    assert response.status_code == 503
    assert response.json()["ready"] is False
    assert client.get("/v2/health/live").status_code == 200  # alive, just not ready


def test_empty_repository_starts_but_is_not_ready(
    app_client: ClientFactory, tmp_path: Path, expect_error: ErrorCheck
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    client = app_client(empty, allow_503=True)
    response = client.get("/v2/health/ready")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "models": [], "reason": "", "workers": 1, "workers_ready": 1}
    expect_error(post_png(client, "/classify"), 404, "'gncnn' not found")


@pytest.mark.parametrize("kind", ["missing", "a-file"])
def test_repository_that_is_not_a_folder_fails_startup(app_client: ClientFactory, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "no_such_repository"
    if kind == "a-file":
        path.write_text("not a folder")
    with pytest.raises(FileNotFoundError) as err:
        app_client(path)
    message = str(err.value)
    assert str(path.resolve()) in message
    assert "NORMSERVE_MODEL_REPOSITORY" in message  # tells the operator which setting to fix


def test_folders_that_are_not_versions_are_ignored(app_client: ClientFactory, repo_copy: Path) -> None:
    (repo_copy / "gncnn" / "latest").mkdir()  # not numeric
    (repo_copy / "gncnn" / "notes.txt").write_text("a file, not a version")
    (repo_copy / ".cache" / "1").mkdir(parents=True)  # hidden
    (repo_copy / "scratch").mkdir()  # a model folder with no versions
    client = app_client(repo_copy)
    response = client.get("/v2/health/ready")
    assert response.status_code == 200
    assert sorted((m["name"], m["version"]) for m in response.json()["models"]) == [
        ("gncnn", "1"),
        ("in_autoencoder", "1"),
    ]


# -- several versions --------------------------------------------------------------------------


def test_newest_version_serves_by_default(app_client: ClientFactory, repo_copy: Path) -> None:
    add_version(repo_copy, "gncnn", "2")
    client = app_client(repo_copy, version_policy="all")

    for route in ("/classify", "/features"):
        body = post_png(client, route).json()
        assert (body["model"], body["version"]) == ("gncnn", "2"), route
    for version in ("1", "2"):
        body = post_png(client, f"/classify?version={version}").json()
        assert body["version"] == version

    assert client.get("/v2/models/gncnn/ready").json()["version"] == "2"
    assert client.get("/v2/models/gncnn/versions/1/ready").status_code == 200
    assert client.get("/v2/models/gncnn").json()["versions"] == ["1", "2"]
    ready = client.get("/v2/health/ready").json()
    assert sorted(f"{m['name']}/{m['version']}" for m in ready["models"]) == ["gncnn/1", "gncnn/2", "in_autoencoder/1"]


def test_versions_order_as_numbers(app_client: ClientFactory, repo_copy: Path) -> None:
    # As strings "9" > "10": the newest must be 10.
    add_version(repo_copy, "gncnn", "9")
    add_version(repo_copy, "gncnn", "10")
    client = app_client(repo_copy, version_policy="all")
    assert post_png(client, "/classify").json()["version"] == "10"
    assert client.get("/v2/models/gncnn").json()["versions"] == ["1", "9", "10"]


def test_broken_new_version_leaves_the_old_one_serving(
    app_client: ClientFactory, repo_copy: Path, expect_error: ErrorCheck
) -> None:
    broken = add_version(repo_copy, "gncnn", "2")
    (broken / "model.onnx").write_bytes(b"garbage")
    client = app_client(repo_copy, allow_503=True, version_policy="all")
    assert client.get("/v2/models/gncnn/versions/2/ready").status_code == 503
    assert client.get("/v2/models/gncnn/versions/1/ready").status_code == 200
    body = post_png(client, "/classify?version=1").json()
    assert body["version"] == "1"
    expect_error(post_png(client, "/classify?version=2"), 503, "gncnn/2")
    # A request naming no version goes to the newest version that is ready, on every door.
    for route in ("/classify", "/features"):
        assert post_png(client, route).json()["version"] == "1", route
    assert client.get("/v2/models/gncnn/ready").json()["version"] == "1"
    assert client.get("/v2/models/gncnn").json()["versions"] == ["1"]
    # Metadata lists only the versions that serve.
    assert client.get("/v2/models/gncnn/versions/1").json()["versions"] == ["1"]


# -- version policy ----------------------------------------------------------------------------


def test_latest_policy_loads_only_the_newest_versions(
    app_client: ClientFactory, repo_copy: Path, expect_error: ErrorCheck
) -> None:
    for version in ("2", "3"):
        add_version(repo_copy, "gncnn", version)
    client = app_client(repo_copy, version_policy="latest:2")

    ready = client.get("/v2/health/ready").json()
    assert ready["ready"] is True
    # Version 1 is not loaded at all: not listed, not counted for readiness.
    assert sorted(f"{m['name']}/{m['version']}" for m in ready["models"]) == ["gncnn/2", "gncnn/3", "in_autoencoder/1"]
    assert client.get("/v2/models/gncnn").json()["versions"] == ["2", "3"]
    assert post_png(client, "/classify").json()["version"] == "3"
    assert post_png(client, "/classify?version=2").json()["version"] == "2"
    assert client.get("/v2/models/gncnn/config").json()["version_policy"] == {"latest": {"num_versions": 2}}

    # A left-out version is 404 with the reason, wherever it is named; a missing one says it is missing.
    for response in (
        post_png(client, "/classify?version=1"),
        client.get("/v2/models/gncnn/versions/1/ready"),
        client.get("/v2/models/gncnn/versions/1"),
        client.post("/v2/models/gncnn/versions/1/infer", json={"inputs": []}),
    ):
        expect_error(response, 404, "version '1' is in the repository but not loaded", "latest:2", "['2', '3']")
    expect_error(post_png(client, "/classify?version=4"), 404, "no version '4'", "['2', '3']")


def test_per_model_policy_overrides_the_default(app_client: ClientFactory, repo_copy: Path) -> None:
    for version in ("2", "3"):
        add_version(repo_copy, "gncnn", version)
        add_version(repo_copy, "in_autoencoder", version)
    client = app_client(repo_copy, version_policy="latest:1", version_policies={"gncnn": "specific:1,3"})
    ready = client.get("/v2/health/ready").json()
    assert sorted(f"{m['name']}/{m['version']}" for m in ready["models"]) == ["gncnn/1", "gncnn/3", "in_autoencoder/3"]
    assert client.get("/v2/models/gncnn/config").json()["version_policy"] == {"specific": {"versions": [1, 3]}}
    assert client.get("/v2/models/in_autoencoder/config").json()["version_policy"] == {"latest": {"num_versions": 1}}
    assert post_png(client, "/classify").json()["version"] == "3"


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"version_policy": "specific:1,5"}, ("'gncnn'", "names versions [5]", "available: [1]")),
        ({"version_policies": {"gncn": "latest:1"}}, ("NORMSERVE_VERSION_POLICIES", "['gncn']", "gncnn")),
    ],
)
def test_policy_that_does_not_fit_the_repository_stops_start_up(
    app_client: ClientFactory, repo_copy: Path, overrides: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError) as err:
        app_client(repo_copy, **overrides)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_repository_index_lists_every_version_on_disk(
    app_client: ClientFactory, repo_copy: Path, expect_error: ErrorCheck
) -> None:
    for version in ("2", "10"):
        add_version(repo_copy, "gncnn", version)
    (repo_copy / "gncnn" / "2" / "model.onnx").write_bytes(b"garbage")
    client = app_client(repo_copy, allow_503=True, version_policy="latest:2")

    def rows(response: Any) -> list[tuple[str, str, str, bool]]:
        assert response.status_code == 200, response.text
        return [(r["name"], r["version"], r["state"], r["ready"]) for r in response.json()]

    everything = [
        ("gncnn", "1", "UNAVAILABLE", False),  # left out by latest:2
        ("gncnn", "2", "UNAVAILABLE", False),  # loaded, but broken
        ("gncnn", "10", "READY", True),  # by number: 10 is the newest
        ("in_autoencoder", "1", "READY", True),
    ]
    # tritonclient posts no body at all; others send {} or {"ready": false}.
    assert rows(client.post("/v2/repository/index")) == everything
    assert rows(client.post("/v2/repository/index", json={})) == everything
    assert rows(client.post("/v2/repository/index", json={"ready": False})) == everything
    assert rows(client.post("/v2/repository/index", json={"ready": True})) == [everything[2], everything[3]]
    reasons = {r["version"]: r["reason"] for r in client.post("/v2/repository/index").json() if r["name"] == "gncnn"}
    assert reasons["1"] == "not loaded: version policy latest:2"
    assert "failed to load" in reasons["2"]
    assert reasons["10"] == ""
    # GET /v2/models lists what was loaded, broken or not.
    assert [(m["name"], m["version"]) for m in client.get("/v2/models").json()] == [
        ("gncnn", "2"),
        ("gncnn", "10"),
        ("in_autoencoder", "1"),
    ]

    expect_error(client.post("/v2/repository/index", json={"ready": "sometimes"}), 422, "ready")
    for body, status in ((b"{not json", 422), (b"\x80\x81", 400)):  # 400: not even text (found by schemathesis)
        response = client.post("/v2/repository/index", content=body, headers={"content-type": "application/json"})
        expect_error(response, status, "json" if status == 422 else "parsing the body")
