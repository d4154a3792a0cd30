"""/reconstruct on images larger than a tile, its response types (Accept) and its pixel limit,
through real apps. Tile settings are small here so the images (and the suite) stay small."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from images import encode, gradient, image_bytes, noise, png_declaring
from onnx_graphs import pointwise_graph
from PIL import Image
from pydantic import ValidationError
from shipped import DENOISER

from normserve.service.imaging import float_to_uint8
from normserve.service.settings import Settings
from normserve.service.state import server_state
from normserve.service.tasks import denoise

ClientFactory = Callable[..., TestClient]
ErrorCheck = Callable[..., str]
SMALL_TILES: dict[str, Any] = {"reconstruct_tile": 32, "reconstruct_overlap": 8, "reconstruct_tile_batch": 3}


def post(client: TestClient, data: bytes, accept: str | None = None) -> Any:
    headers = {"content-type": "image/png", **({"accept": accept} if accept else {})}
    return client.post("/reconstruct", content=data, headers=headers)


def decoded(data: bytes, fmt: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == fmt
        assert img.mode == "RGB"
        return np.asarray(img)


@pytest.fixture
def identity_repo(repo_copy: Path) -> Path:
    """The committed repository with the served denoiser's graph swapped for the identity (same names)."""
    (repo_copy / "in_autoencoder" / DENOISER / "model.onnx").write_bytes(pointwise_graph(output_name="reconstruction"))
    return repo_copy


# -- tiling through the route ------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(100, 70), (33, 200), (97, 41)])
def test_tiled_identity_returns_the_image_exactly(
    app_client: ClientFactory, identity_repo: Path, width: int, height: int
) -> None:
    client = app_client(identity_repo, **SMALL_TILES)
    pixels = noise(width, height, seed=3)
    response = post(client, encode(Image.fromarray(pixels), "PNG"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(decoded(response.content, "PNG"), pixels)  # every tile put back in place


def test_large_image_is_denoised_in_tiles(app_client: ClientFactory) -> None:
    client = app_client(**SMALL_TILES)
    pixels = noise(100, 70, seed=1)
    response = post(client, encode(Image.fromarray(pixels), "PNG"))
    assert response.status_code == 200, response.text
    got = decoded(response.content, "PNG")
    assert got.shape == (70, 100, 3)
    # Exactly what the tiling module computes with the served model and these settings...
    served = server_state(client.app).repository.get("in_autoencoder")

    def run(x: np.ndarray) -> np.ndarray:
        y: np.ndarray = served.predict({"image": x})["reconstruction"]
        return y

    expected = float_to_uint8(denoise(run, pixels, 32, 8, 3, "cosine"))
    np.testing.assert_array_equal(got, expected)
    # ...and not the whole-image run: the tiles were really used.
    whole = decoded(post(app_client(reconstruct_tile=128), encode(Image.fromarray(pixels), "PNG")).content, "PNG")
    assert np.abs(got.astype(int) - whole.astype(int)).mean() > 0.1


def test_image_within_one_tile_is_unchanged_by_the_tile_settings(app_client: ClientFactory) -> None:
    data = encode(Image.fromarray(noise(32, 30, seed=2)), "PNG")
    small_tiles = post(app_client(**SMALL_TILES), data).content
    default = post(app_client(), data).content
    assert small_tiles == default


def test_overlap_over_half_a_tile_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"reconstruct_overlap .* at most half"):
        Settings(_env_file=None, reconstruct_tile=64, reconstruct_overlap=33)  # type: ignore[call-arg]


# -- Accept: PNG, WebP, JPEG, JSON, or 406 -------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "media", "fmt"),
    [
        (None, "image/png", "PNG"),
        ("image/png", "image/png", "PNG"),
        ("*/*", "image/png", "PNG"),
        ("image/*", "image/png", "PNG"),
        ("image/webp", "image/webp", "WEBP"),
        ("image/jpeg", "image/jpeg", "JPEG"),
        ("image/webp;q=0.5, image/jpeg;q=0.9", "image/jpeg", "JPEG"),
        ("text/html, image/webp;q=0.8", "image/webp", "WEBP"),
        ("image/png;q=0, image/*", "image/webp", "WEBP"),  # refused with q=0, never chosen
        ("image/avif, image/webp, */*;q=0.8", "image/webp", "WEBP"),  # a browser's img Accept
    ],
)
def test_reconstruct_answers_the_accepted_type(
    app_client: ClientFactory, identity_repo: Path, accept: str | None, media: str, fmt: str
) -> None:
    client = app_client(identity_repo, **SMALL_TILES)
    pixels = gradient(80, 48)
    response = post(client, encode(Image.fromarray(pixels), "PNG"), accept)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media
    got = decoded(response.content, fmt).astype(int)
    assert got.shape == pixels.shape
    if fmt == "PNG":
        np.testing.assert_array_equal(got, pixels)
    else:  # lossy at quality 90: close on a smooth image, not equal
        assert np.abs(got - pixels).mean() < 2.0


def test_quality_settings_change_the_lossy_encodings(app_client: ClientFactory, identity_repo: Path) -> None:
    data = encode(Image.fromarray(noise(64, 48)), "PNG")
    low = app_client(identity_repo, jpeg_quality=20, webp_quality=20)
    high = app_client(identity_repo)
    for accept in ("image/jpeg", "image/webp"):
        assert len(post(low, data, accept).content) < len(post(high, data, accept).content), accept


def test_png_compress_level_setting(app_client: ClientFactory, identity_repo: Path) -> None:
    data = encode(Image.fromarray(gradient(96, 64)), "PNG")
    fast, small = (
        post(app_client(identity_repo), data).content,
        post(app_client(identity_repo, png_compress_level=9), data).content,
    )
    assert len(small) < len(fast)
    np.testing.assert_array_equal(decoded(small, "PNG"), decoded(fast, "PNG"))


def test_json_still_carries_png(client: TestClient) -> None:
    response = post(client, image_bytes(40, 20), "application/json")
    assert response.status_code == 200, response.text
    assert response.json()["media_type"] == "image/png"
    assert decoded(base64.b64decode(response.json()["image"]), "PNG").shape == (20, 40, 3)


@pytest.mark.parametrize("accept", ["image/avif", "text/html", "image/png;q=0", "application/xml, image/gif"])
def test_unavailable_type_is_406(client: TestClient, expect_error: ErrorCheck, accept: str) -> None:
    expect_error(post(client, image_bytes(16, 16), accept), 406, "accept", "image/png", "image/webp", "image/jpeg")


def test_webp_refuses_sides_it_cannot_hold(client: TestClient, expect_error: ErrorCheck) -> None:
    data = image_bytes(16_400, 5)  # fine as PNG, too wide for WebP: refused before the model runs
    expect_error(post(client, data, "image/webp"), 406, "16383", "16400x5", "image/png")
    assert post(client, image_bytes(300, 5), "image/webp").status_code == 200


def test_openapi_lists_the_response_types(client: TestClient) -> None:
    responses = client.get("/openapi.json").json()["paths"]["/reconstruct"]["post"]["responses"]
    assert {"image/png", "image/webp", "image/jpeg", "application/json"} <= set(responses["200"]["content"])
    assert {"406", "413"} <= set(responses)


# -- the pixel limit -------------------------------------------------------------------------------


def test_default_limit_is_24_megapixels_checked_from_the_header(
    client: TestClient, app_client: ClientFactory, expect_error: ErrorCheck
) -> None:
    # Header-only files: a few hundred bytes that declare the size. Over the limit is refused from
    # the header (413) before any pixel is decoded; at the limit the header passes and decoding
    # then finds the data missing (400), once the pixels-per-byte bound is off (with it, such a
    # file is refused as a decompression bomb: tests/service/test_budget.py).
    expect_error(
        post(client, png_declaring(6001, 4000)),
        413,
        "6001x4000",
        "24004000",
        "24000000",
        "NORMSERVE_MAX_RECONSTRUCT_PIXELS",
    )
    expect_error(post(app_client(max_pixels_per_byte=0), png_declaring(6000, 4000)), 400, "truncated")


def test_image_limit_wins_when_lower(app_client: ClientFactory, expect_error: ErrorCheck) -> None:
    client = app_client(max_image_pixels=1000)
    expect_error(post(client, png_declaring(50, 50)), 413, "50x50", "1000", "NORMSERVE_MAX_IMAGE_PIXELS")
