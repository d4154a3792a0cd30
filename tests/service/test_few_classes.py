"""A classifier with fewer than five classes works with the defaults: `/classify` returns
min(5, classes) labels when no top_k is given, and a top_k above the class count is clamped to it,
as V2's classification extension (`class_count`) clamps; both routes (raw and FastAPI) alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from class_subset import write_class_subset
from conftest import ClientFactory
from fastapi.testclient import TestClient
from images import image_bytes

from normserve.service.schemas import ClassifyResponse

KEEP = ["cat", "ship"]


@pytest.fixture(scope="module")
def two_class_repo(tmp_path_factory: pytest.TempPathFactory, committed_model_repository: Path) -> Path:
    """Only a 2-class classifier (the shipped fp32 classifier cut down to two classes), no denoiser."""
    repo = tmp_path_factory.mktemp("two_class")
    write_class_subset(repo, committed_model_repository / "gncnn" / "7", KEEP)
    return repo


def _classify(client: TestClient, params: dict[str, str]) -> list[dict[str, object]]:
    response = client.post(
        "/classify", content=image_bytes(40, 30), headers={"content-type": "image/png"}, params=params
    )
    assert response.status_code == 200, response.text
    ClassifyResponse.model_validate_json(response.content)
    return list(response.json()["predictions"])


@pytest.mark.parametrize("raw_routes", [True, False])
@pytest.mark.parametrize(("top_k", "expected"), [(None, 2), ("1", 1), ("2", 2), ("5", 2), ("1000", 2)])
def test_top_k_is_at_most_the_class_count(
    app_client: ClientFactory, two_class_repo: Path, raw_routes: bool, top_k: str | None, expected: int
) -> None:
    client = app_client(two_class_repo, raw_routes=raw_routes)
    predictions = _classify(client, {} if top_k is None else {"top_k": top_k})
    assert len(predictions) == expected
    assert {p["label"] for p in predictions} <= set(KEEP)
    if expected == 2:
        assert sum(float(p["probability"]) for p in predictions) == pytest.approx(1.0, abs=1e-6)  # type: ignore[arg-type]


@pytest.mark.parametrize(("top_k", "expected"), [(None, 5), ("10", 10), ("11", 10)])
def test_ten_classes_default_to_five_and_clamp_to_ten(client: TestClient, top_k: str | None, expected: int) -> None:
    assert len(_classify(client, {} if top_k is None else {"top_k": top_k})) == expected


@pytest.mark.parametrize(("class_count", "expected"), [(1, 1), (2, 2), (5, 2)])
def test_v2_class_count_clamps_the_same_way(
    app_client: ClientFactory, two_class_repo: Path, class_count: int, expected: int
) -> None:
    client = app_client(two_class_repo)
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    body = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
        "outputs": [{"name": "logits", "parameters": {"classification": class_count}}],
    }
    response = client.post("/v2/models/gncnn/infer", json=body)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert out["shape"] == [3, expected] and out["datatype"] == "BYTES"
    assert all(entry.split(":")[2] in KEEP for entry in out["data"])


@pytest.mark.parametrize(("only", "served"), [("gncnn", {"classifier"}), ("in_autoencoder", {"denoiser"})])
def test_the_page_learns_which_routes_are_served(
    app_client: ClientFactory, tmp_path: Path, committed_model_repository: Path, only: str, served: set[str]
) -> None:
    """/ui/routes, what the demo page reads to show only the panels of served models."""
    newest = max((committed_model_repository / only).iterdir(), key=lambda p: int(p.name))
    shutil.copytree(newest, tmp_path / "repo" / only / newest.name)
    routes = app_client(tmp_path / "repo").get("/ui/routes").json()
    assert {role for role, entry in routes.items() if entry["served"]} == served
    assert routes["denoiser"]["routes"] == ["/reconstruct"] and routes["classifier"]["model"] == "gncnn"
