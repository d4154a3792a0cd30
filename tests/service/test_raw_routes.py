"""POST /classify answered by `RawRoutes` (NORMSERVE_RAW_ROUTES, on by default) gives exactly what
FastAPI's route gives: the same body for a good request, the same status and message for every
bad one; the raw path is really taken; and the in-memory multipart reader refuses what it should."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from conftest import ClientFactory, ErrorCheck
from fastapi import APIRouter
from fastapi.testclient import TestClient
from images import image_bytes, multipart

from normserve.service.raw_routes import RawRoutes
from normserve.service.routes import images
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
        RawRoutes(lambda *a: None, router=images.router, endpoints={"/nowhere": endpoint})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="POST /classify has no FastAPI route"):
        RawRoutes(lambda *a: None, router=APIRouter(), endpoints={"/classify": endpoint})  # type: ignore[arg-type]


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
