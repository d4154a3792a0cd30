"""POST /classify and V2 infer answered by `RawRoutes` (NORMSERVE_RAW_ROUTES, on by default) give
exactly what FastAPI's routes give: the same body for a good request, the same status and message
for every bad one; the raw path is really taken, path parameters included; and the in-memory
multipart reader refuses what it should."""

from __future__ import annotations

import gc
import json
from typing import Any

import numpy as np
import pytest
import shipped
from conftest import ClientFactory, ErrorCheck
from fastapi import APIRouter
from fastapi.testclient import TestClient
from images import image_bytes, multipart

from normserve.service.raw_routes import RawRoutes
from normserve.service.routes import images, v2
from normserve.service.schemas import ClassifyResponse

PNG_BYTES = image_bytes(40, 30)
TEXT_FILE, TEXT_FILE_TYPE = multipart([("file", None, b"hello")])
TWO_FILES, TWO_FILES_TYPE = multipart([("file", "a.png", PNG_BYTES), ("file", "b.png", PNG_BYTES)])

# (name, request kwargs for POST /classify); each is answered the same on both paths.
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("multipart", {"files": {"file": ("a.png", PNG_BYTES, "image/png")}}),
    ("raw-body", {"content": PNG_BYTES, "headers": {"content-type": "image/png"}}),
    ("top-k-3", {"content": PNG_BYTES, "headers": {"content-type": "image/png"}, "params": {"top_k": "3"}}),
    ("version-3", {"content": PNG_BYTES, "headers": {"content-type": "image/png"}, "params": {"version": "3"}}),
    ("top-k-0", {"content": PNG_BYTES, "headers": {"content-type": "image/png"}, "params": {"top_k": "0"}}),
    ("top-k-text", {"content": PNG_BYTES, "headers": {"content-type": "image/png"}, "params": {"top_k": "many"}}),
    ("top-k-11", {"content": PNG_BYTES, "headers": {"content-type": "image/png"}, "params": {"top_k": "11"}}),
    ("unknown-model", {"content": PNG_BYTES, "headers": {"content-type": "image/png"}, "params": {"model": "nope"}}),
    ("unknown-version", {"content": PNG_BYTES, "headers": {"content-type": "image/png"}, "params": {"version": "99"}}),
    (
        "denoiser",
        {"content": PNG_BYTES, "headers": {"content-type": "image/png"}, "params": {"model": "in_autoencoder"}},
    ),
    ("no-content-type", {"content": PNG_BYTES}),
    ("not-an-image", {"content": b"not an image", "headers": {"content-type": "image/png"}}),
    ("text-field", {"content": TEXT_FILE, "headers": {"content-type": TEXT_FILE_TYPE}}),
    ("two-files", {"content": TWO_FILES, "headers": {"content-type": TWO_FILES_TYPE}}),
    ("no-boundary", {"content": b"junk", "headers": {"content-type": "multipart/form-data"}}),
    ("too-large", {"content": b"\0" * 4096, "headers": {"content-type": "image/png"}}),
]


def _v2(shape: list[int], binary: bool = False, **request: Any) -> dict[str, Any]:
    """POST kwargs of a V2 request for input `image` of `shape` (JSON numbers or binary)."""
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    tensor: dict[str, Any] = {"name": "image", "shape": shape, "datatype": "FP32"}
    if not binary:
        return {"content": json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}], **request}).encode()}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}], **request}).encode()
    return {"content": header + x.tobytes(), "headers": {"Inference-Header-Content-Length": str(len(header))}}


# (name, path, request kwargs) of V2 infer requests; each is answered the same on both paths.
V2_STATUS = {"unknown-model": 404, "unknown-version": 404, "bad-json": 400, "shape": 400, "too-large": 413}
V2_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("json", "/v2/models/gncnn/infer", _v2([1, 3, 8, 8])),
    ("binary", "/v2/models/gncnn/infer", _v2([2, 3, 8, 8], binary=True)),
    ("binary-out", "/v2/models/gncnn/infer", _v2([1, 3, 8, 8], parameters={"binary_data_output": True})),
    ("version", f"/v2/models/gncnn/versions/{shipped.GNCNN}/infer", _v2([1, 3, 8, 8])),
    ("denoiser", f"/v2/models/in_autoencoder/versions/{shipped.DENOISER}/infer", _v2([1, 3, 8, 8], binary=True)),
    ("id-and-outputs", "/v2/models/gncnn/infer", _v2([1, 3, 8, 8], id="r1", outputs=[{"name": "logits"}])),
    ("unknown-model", "/v2/models/nope/infer", _v2([1, 3, 8, 8])),
    ("unknown-version", "/v2/models/gncnn/versions/99/infer", _v2([1, 3, 8, 8])),
    ("bad-json", "/v2/models/gncnn/infer", {"content": b"{"}),
    ("shape", "/v2/models/gncnn/infer", _v2([3, 8, 8])),
    ("too-large", "/v2/models/gncnn/infer", _v2([1, 3, 40, 40], binary=True)),
]


@pytest.fixture
def both(app_client: ClientFactory) -> dict[bool, TestClient]:
    """An app with raw routes and one without, both with a 2 KiB body limit."""
    return {raw: app_client(raw_routes=raw, max_body_bytes=2048) for raw in (True, False)}


@pytest.mark.parametrize(("name", "request_kwargs"), REQUESTS, ids=[n for n, _ in REQUESTS])
def test_raw_and_fastapi_answer_alike(both: dict[bool, TestClient], name: str, request_kwargs: dict[str, Any]) -> None:
    raw, fastapi = (both[flag].post("/classify", **request_kwargs) for flag in (True, False))
    assert (raw.status_code, raw.json()) == (fastapi.status_code, fastapi.json()), name
    assert raw.headers["content-type"] == fastapi.headers["content-type"] == "application/json"
    if raw.status_code == 200:
        ClassifyResponse.model_validate_json(raw.content)  # the declared response model holds
    else:
        assert set(raw.json()) == {"error"} and raw.status_code < 500


@pytest.fixture
def both_v2(app_client: ClientFactory) -> dict[bool, TestClient]:
    """An app with raw routes and one without, both with a 16 KiB body limit."""
    return {raw: app_client(raw_routes=raw, max_body_bytes=16384) for raw in (True, False)}


@pytest.mark.parametrize(("name", "path", "request_kwargs"), V2_REQUESTS, ids=[n for n, _, _ in V2_REQUESTS])
def test_v2_raw_and_fastapi_answer_alike(
    both_v2: dict[bool, TestClient], name: str, path: str, request_kwargs: dict[str, Any]
) -> None:
    raw, fastapi = (both_v2[flag].post(path, **request_kwargs) for flag in (True, False))
    assert (raw.status_code, raw.content) == (fastapi.status_code, fastapi.content), name
    assert raw.status_code == V2_STATUS.get(name, 200), raw.text
    for header in ("content-type", "inference-header-content-length"):
        assert raw.headers.get(header) == fastapi.headers.get(header), header
    if raw.status_code != 200:
        assert set(raw.json()) == {"error"} and raw.status_code < 500


def test_the_raw_v2_path_is_taken_with_its_parameters(
    monkeypatch: pytest.MonkeyPatch, app_client: ClientFactory
) -> None:
    calls: list[dict[str, str]] = []
    real = v2.infer_raw

    async def spy(request: Any) -> Any:
        calls.append(dict(request.path_params))
        return await real(request)

    monkeypatch.setitem(v2.RAW_ROUTES, "/v2/models/{name}/infer", spy)
    monkeypatch.setitem(v2.RAW_ROUTES, "/v2/models/{name}/versions/{version}/infer", spy)
    on, off = app_client(), app_client(raw_routes=False)
    kwargs = _v2([1, 3, 8, 8])
    assert on.post("/v2/models/gncnn/infer", **kwargs).status_code == 200
    assert on.post(f"/v2/models/gncnn/versions/{shipped.GNCNN}/infer", **kwargs).status_code == 200
    assert calls == [{"name": "gncnn"}, {"name": "gncnn", "version": shipped.GNCNN}]
    assert off.post("/v2/models/gncnn/infer", **kwargs).status_code == 200
    assert on.get("/v2/models/gncnn/infer").status_code == 405  # other methods reach FastAPI's route table
    assert on.post("/v2/models/gncnn/extra/infer", **kwargs).status_code == 404  # one segment per parameter
    assert on.post("/v2/repository/index").status_code == 200  # a POST of the same router, not raw
    assert len(calls) == 2


def test_the_raw_path_is_taken(monkeypatch: pytest.MonkeyPatch, app_client: ClientFactory) -> None:
    calls: list[str] = []
    real = images.classify_raw

    async def spy(request: Any) -> Any:
        calls.append(request.url.path)
        return await real(request)

    monkeypatch.setattr(images, "classify_raw", spy)
    on, off = app_client(), app_client(raw_routes=False)
    assert on.post("/classify", content=PNG_BYTES, headers={"content-type": "image/png"}).status_code == 200
    assert calls == ["/classify"]
    assert off.post("/classify", content=PNG_BYTES, headers={"content-type": "image/png"}).status_code == 200
    assert on.get("/classify").status_code == 405  # other methods still reach FastAPI's route table
    assert on.post("/features", content=PNG_BYTES, headers={"content-type": "image/png"}).status_code == 200
    assert calls == ["/classify"]


def test_a_raw_route_must_be_declared() -> None:
    async def endpoint(request: Any) -> Any:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="POST /nowhere has no FastAPI route"):
        RawRoutes(lambda *a: None, routers=[images.router], endpoints={"/nowhere": endpoint})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="POST /classify has no FastAPI route"):
        RawRoutes(lambda *a: None, routers=[APIRouter()], endpoints={"/classify": endpoint})  # type: ignore[arg-type]


@pytest.mark.parametrize("raw_routes", [True, False])
def test_multipart_part_limits(app_client: ClientFactory, expect_error: ErrorCheck, raw_routes: bool) -> None:
    client = app_client(raw_routes=raw_routes)
    many, many_type = multipart([("file", "a.png", PNG_BYTES)] + [(f"f{i}", None, b"x") for i in range(64)])
    expect_error(client.post("/classify", content=many, headers={"content-type": many_type}), 400, "more than 64 parts")
    nameless = (
        b'--b\r\nContent-Disposition: form-data; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        + PNG_BYTES
        + b"\r\n--b--\r\n"
    )
    headers = {"content-type": "multipart/form-data; boundary=b"}
    expect_error(client.post("/classify", content=nameless, headers=headers), 400, "no Content-Disposition", "name")


def test_start_up_objects_are_frozen_out_of_the_collector(app_client: ClientFactory) -> None:
    app_client()
    assert gc.get_freeze_count() > 0  # a full collection under load skips what start-up made
