"""The image routes (/classify, /features, /reconstruct) through a real app with real ONNX Runtime
sessions over the committed model repository: request encodings, response shapes and values,
limits, and a 4xx JSON error (never a 5xx) for every kind of bad request."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from bad_inputs import BAD_REQUESTS
from fastapi.testclient import TestClient
from images import (
    ACCEPTED_FORMATS,
    encode,
    exif_jpeg,
    gray16,
    image_bytes,
    multipart,
    noise,
    palette_with_transparency,
    png,
    png_declaring,
    solid,
)
from PIL import Image
from shipped import DENOISER, GNCNN

ROUTES = ["/classify", "/features", "/reconstruct"]
ClientFactory = Callable[..., TestClient]  # the app_client fixture
ErrorCheck = Callable[..., str]  # the expect_error fixture
NPZ = "application/x-npz"


# -- helpers ---------------------------------------------------------------------------------


def post_raw(client: httpx.Client, route: str, data: bytes, mime: str = "image/png", **kwargs: Any) -> httpx.Response:
    """POST the image as a raw body with its MIME type."""
    headers = {"content-type": mime, **kwargs.pop("headers", {})}
    return client.post(route, content=data, headers=headers, **kwargs)


def post_file(client: httpx.Client, route: str, data: bytes, mime: str = "image/png", **kwargs: Any) -> httpx.Response:
    """POST the image as multipart field `file`."""
    return client.post(route, files={"file": ("image", data, mime)}, **kwargs)


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        assert img.mode == "RGB"
        return img.size


def level_array(level: dict[str, Any]) -> np.ndarray:
    """A /features JSON level decoded: base64 of little-endian float32 in C order."""
    raw = base64.b64decode(level["data"], validate=True)
    assert len(raw) == 4 * math.prod(level["shape"]), "data length must match the declared shape"
    return np.frombuffer(raw, dtype="<f4").reshape(level["shape"])


def expected_level_shapes(config: dict[str, Any], height: int, width: int) -> dict[str, list[int]]:
    """Shapes of P3/P4/P5 from config.json's feature_info: stride-s levels are ceil(H/s) x ceil(W/s)."""
    return {
        lv["name"]: [1, lv["channels"], math.ceil(height / lv["stride"]), math.ceil(width / lv["stride"])]
        for lv in config["feature_info"]
    }


def assert_still_serving(client: httpx.Client) -> None:
    """The app answers health and a real inference after whatever the test sent it."""
    assert client.get("/v2/health/live").json() == {"live": True}
    response = post_raw(client, "/classify", png(16, 16))
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 5


# -- /classify -------------------------------------------------------------------------------

ENCODINGS: dict[str, Callable[[httpx.Client, str, bytes], httpx.Response]] = {
    "multipart": post_file,
    "raw-image/png": post_raw,
    "raw-octet-stream": lambda c, route, data: post_raw(c, route, data, "application/octet-stream"),
}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_classify_accepts_each_encoding(client: TestClient, gncnn_config: dict[str, Any], encoding: str) -> None:
    response = ENCODINGS[encoding](client, "/classify", image_bytes(48, 20))
    assert response.status_code == 200, response.text
    body = response.json()
    # `trained` is what config.json records (false for the committed random-init weights), never a default.
    assert (body["model"], body["version"], body["trained"]) == ("gncnn", GNCNN, gncnn_config["weights"]["trained"])
    assert body["input"] == {"width": 48, "height": 20, "format": "PNG"}
    assert len(body["predictions"]) == 5  # the default top_k


def test_classify_encodings_give_the_same_answer(client: TestClient) -> None:
    data = encode(Image.fromarray(noise(40, 30)), "PNG")
    answers = [ENCODINGS[e](client, "/classify", data).json()["predictions"] for e in sorted(ENCODINGS)]
    assert answers[0] == answers[1] == answers[2]


def test_classify_depends_on_the_image(client: TestClient) -> None:
    # Guards against a route that ignores its input: two different images, different distributions.
    a = post_raw(client, "/classify?top_k=10", png(32, 32)).json()["predictions"]
    b = post_raw(client, "/classify?top_k=10", encode(Image.fromarray(noise(32, 32)), "PNG")).json()["predictions"]
    pa = {p["label"]: p["probability"] for p in a}
    pb = {p["label"]: p["probability"] for p in b}
    assert max(abs(pa[k] - pb[k]) for k in pa) > 1e-4


@pytest.mark.parametrize("fmt", sorted(ACCEPTED_FORMATS))
def test_classify_each_format(client: TestClient, fmt: str) -> None:
    response = post_raw(client, "/classify", image_bytes(33, 21, fmt), ACCEPTED_FORMATS[fmt])
    assert response.status_code == 200, response.text
    assert response.json()["input"] == {"width": 33, "height": 21, "format": fmt}


@pytest.mark.parametrize(
    "data",
    [
        encode(solid("RGBA", (20, 20), (0, 0, 0, 0)), "PNG"),
        encode(solid("L", (20, 20), 90), "PNG"),
        encode(gray16([0, 32896, 65535] * 4), "PNG"),
        encode(palette_with_transparency()[0], "GIF", transparency=0),
        encode(solid("CMYK", (20, 20), (0, 255, 0, 0)), "JPEG"),
        image_bytes(300, 200),
    ],
    ids=["RGBA", "L", "I;16", "P-transparency", "CMYK-JPEG", "300x200"],
)
def test_classify_any_mode_and_size(client: TestClient, data: bytes) -> None:
    response = post_raw(client, "/classify", data)
    assert response.status_code == 200, response.text
    probabilities = [p["probability"] for p in response.json()["predictions"]]
    assert all(0.0 < p < 1.0 for p in probabilities)


@pytest.mark.parametrize(
    ("width", "height", "route", "trips"),
    [
        (32, 32, "/classify", 0),
        (128, 128, "/classify", 0),  # 16,384 pixels, the inline limit, in a ~49 KB PNG
        (129, 128, "/classify", 1),
        # a body over 64 KiB: its header is read in the pool too, then (memory reserved) the pixels
        (300, 200, "/classify", 2),
        (32, 32, "/features?resize=false", 0),
        (300, 200, "/features?resize=false", 2),
    ],
)
def test_small_images_decode_on_the_event_loop(
    app_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, width: int, height: int, route: str, trips: int
) -> None:
    """Images of at most NORMSERVE_INLINE_DECODE_PIXELS pixels skip the thread-pool trip; larger
    ones take one (two for a body over 64 KiB); the answer is the same as with inline decoding off,
    which decodes every image in the pool (a header of at most 64 KiB is still read inline)."""
    from normserve.service import budget, governor

    calls: list[str] = []
    real = governor.run_in_threadpool

    async def counting(fn: Callable[..., Any], *args: Any) -> Any:
        if fn.__name__ != "_features_response":  # /features encodes its answer in the pool, whatever the size
            calls.append(fn.__name__)
        return await real(fn, *args)

    monkeypatch.setattr(governor, "run_in_threadpool", counting)  # every thread trip of a request
    monkeypatch.setattr(budget, "run_in_threadpool", counting)  # (those of a governed request: Held.in_thread)
    data = encode(Image.fromarray(noise(width, height)), "PNG")
    inline = post_raw(app_client(), route, data)
    assert inline.status_code == 200, inline.text
    assert len(calls) == trips, calls
    pooled = post_raw(app_client(inline_decode_pixels=0), route, data)
    assert len(calls) == trips + max(trips, 1), calls
    assert inline.json() == pooled.json()


@pytest.mark.parametrize("top_k", [None, 1, 3, 10])
def test_classify_top_k(client: TestClient, gncnn_config: dict[str, Any], top_k: int | None) -> None:
    params = {} if top_k is None else {"top_k": top_k}
    response = post_raw(client, "/classify", image_bytes(32, 32), params=params)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == (top_k or 5)
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    labels = gncnn_config["labels"]
    for p in predictions:
        assert p["label"] == labels[p["index"]]  # index and label agree with config.json
    assert len({p["index"] for p in predictions}) == len(predictions)


def test_classify_all_classes_form_a_distribution(client: TestClient, gncnn_config: dict[str, Any]) -> None:
    predictions = post_raw(client, "/classify?top_k=10", image_bytes(32, 32)).json()["predictions"]
    assert sorted(p["label"] for p in predictions) == sorted(gncnn_config["labels"])
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-6)
    assert all(p["probability"] > 0.0 for p in predictions)


@pytest.mark.parametrize(
    ("top_k", "status", "fragments"),
    [
        ("0", 422, ("top_k", "greater than or equal to 1")),
        ("-3", 422, ("top_k",)),
        ("abc", 422, ("top_k", "integer")),
    ],
)
def test_classify_bad_top_k(
    client: TestClient, expect_error: ErrorCheck, top_k: str, status: int, fragments: tuple[str, ...]
) -> None:
    expect_error(post_raw(client, f"/classify?top_k={top_k}", png()), status, *fragments)
    assert_still_serving(client)


# -- /features -------------------------------------------------------------------------------


def test_features_json_at_model_size(client: TestClient, gncnn_config: dict[str, Any]) -> None:
    response = post_raw(client, "/features", image_bytes(60, 40))
    assert response.status_code == 200, response.text
    body = response.json()
    height, width = gncnn_config["preprocessing"]["resize"]
    assert body["tensor_size"] == [height, width]
    assert body["input"] == {"width": 60, "height": 40, "format": "PNG"}
    declared = {lv["name"]: lv for lv in gncnn_config["feature_info"]}
    assert [lv["name"] for lv in body["levels"]] == ["P3", "P4", "P5"]
    shapes = expected_level_shapes(gncnn_config, height, width)
    for level in body["levels"]:
        spec = declared[level["name"]]
        assert (level["output"], level["stride"], level["channels"]) == (
            spec["output"],
            spec["stride"],
            spec["channels"],
        )
        assert (level["dtype"], level["byte_order"]) == ("float32", "little")
        assert level["shape"] == shapes[level["name"]]
        values = level_array(level)
        assert np.isfinite(values).all()
        assert values.std() > 0  # a real feature map, not zeros


# 40x60 is the documented example: with strides 1, 2, 4 that is P3 40x60, P4 20x30, P5 10x15.
@pytest.mark.parametrize(("height", "width"), [(40, 60), (37, 53), (5, 7), (1, 1), (9, 2)])
def test_features_native_size(client: TestClient, gncnn_config: dict[str, Any], height: int, width: int) -> None:
    response = post_raw(client, "/features?resize=false", image_bytes(width, height))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tensor_size"] == [height, width]
    shapes = expected_level_shapes(gncnn_config, height, width)
    assert {lv["name"]: lv["shape"] for lv in body["levels"]} == shapes
    for level in body["levels"]:
        assert np.isfinite(level_array(level)).all()


@pytest.mark.parametrize("resize", ["true", "false"])
def test_features_npz_matches_json(client: TestClient, gncnn_config: dict[str, Any], resize: str) -> None:
    data = encode(Image.fromarray(noise(45, 30)), "PNG")
    as_json = post_raw(client, f"/features?resize={resize}", data).json()
    response = post_raw(client, f"/features?resize={resize}", data, headers={"accept": NPZ})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == NPZ
    assert response.headers["x-model"] == f"gncnn/{GNCNN}"
    with np.load(io.BytesIO(response.content), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    assert sorted(arrays) == ["P3", "P4", "P5"]
    height, width = (30, 45) if resize == "false" else tuple(gncnn_config["preprocessing"]["resize"])
    shapes = expected_level_shapes(gncnn_config, height, width)
    for level in as_json["levels"]:
        array = arrays[level["name"]]
        assert array.dtype == np.dtype("<f4")
        assert list(array.shape) == shapes[level["name"]]
        np.testing.assert_array_equal(array, level_array(level))  # the two encodings carry the same tensor


@pytest.mark.parametrize("accept", ["application/json", NPZ])
def test_features_float16_halves_the_answer(client: TestClient, accept: str) -> None:
    """`?dtype=float16`: the same maps in half the bytes (a native-size photo's .npz is tens of MB)."""
    data = encode(Image.fromarray(noise(120, 80)), "PNG")
    answers = {
        dtype: post_raw(client, f"/features?resize=false&dtype={dtype}", data, headers={"accept": accept})
        for dtype in ("float32", "float16")
    }
    for response in answers.values():
        assert response.status_code == 200, response.text
    if accept == NPZ:
        with (
            np.load(io.BytesIO(answers["float32"].content), allow_pickle=False) as full,
            np.load(io.BytesIO(answers["float16"].content), allow_pickle=False) as half,
        ):
            pairs = [(full[name], half[name]) for name in full.files]
    else:
        levels = zip(answers["float32"].json()["levels"], answers["float16"].json()["levels"], strict=True)
        pairs = []
        for f32, f16 in levels:
            assert (f32["dtype"], f16["dtype"]) == ("float32", "float16")
            half_array = np.frombuffer(base64.b64decode(f16["data"]), "<f2").reshape(f16["shape"])
            pairs.append((level_array(f32), half_array))
    for full_array, half_array in pairs:
        assert half_array.dtype == np.dtype("<f2") and half_array.shape == full_array.shape
        np.testing.assert_allclose(half_array.astype(np.float32), full_array, rtol=1e-3, atol=1e-3)
    ratio = len(answers["float16"].content) / len(answers["float32"].content)
    assert 0.45 < ratio < 0.55, ratio


def test_features_dtype_is_checked(client: TestClient, expect_error: ErrorCheck) -> None:
    expect_error(post_raw(client, "/features?dtype=int8", png()), 422, "dtype")
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("accept", "media"),
    [
        (None, "application/json"),
        ("application/json", "application/json"),
        ("*/*", "application/json"),
        ("application/*", "application/json"),
        (NPZ, NPZ),
        (f"application/json;q=0.4, {NPZ};q=0.9", NPZ),
        (f"{NPZ};q=0.4, application/json", "application/json"),
        ("text/html", "application/json"),  # nothing matches: the first offer, not 406
    ],
)
def test_features_content_negotiation(client: TestClient, accept: str | None, media: str) -> None:
    headers = {"accept": accept} if accept else {}
    response = post_raw(client, "/features", png(), headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == media


def test_features_never_answers_a_type_refused_with_q0(client: TestClient) -> None:
    response = post_raw(client, "/features", png(), headers={"accept": f"{NPZ};q=0"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == "application/json"


def test_features_native_size_limit(app_client: ClientFactory, expect_error: ErrorCheck) -> None:
    client = app_client(max_features_pixels=1000)
    assert post_raw(client, "/features?resize=false", png(40, 25)).status_code == 200  # exactly the limit
    expect_error(
        post_raw(client, "/features?resize=false", png(41, 25)),
        413,
        "41x25",
        "1000",
        "NORMSERVE_MAX_FEATURES_PIXELS",
    )
    # At the model's size the image is resized first, so the native-size limit does not apply.
    assert post_raw(client, "/features", png(41, 25)).status_code == 200
    # Checked from the header: a PNG that only declares its size (no pixel data to decode) is a
    # 413 for its size, not a 400 for its missing pixels.
    expect_error(post_raw(client, "/features?resize=false", png_declaring(2000, 1000)), 413, "2000x1000")


# -- /reconstruct ----------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(32, 32), (53, 37), (37, 53), (7, 5), (5, 7), (64, 48), (250, 6)])
def test_reconstruct_png_at_input_size(client: TestClient, width: int, height: int) -> None:
    response = post_file(client, "/reconstruct", image_bytes(width, height))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-model"] == f"in_autoencoder/{DENOISER}"
    assert png_size(response.content) == (width, height)


def test_reconstruct_at_exactly_min_side(client: TestClient, denoiser_config: dict[str, Any]) -> None:
    side = denoiser_config["preprocessing"]["min_side"]  # read, not assumed: re-exports may change it
    response = post_raw(client, "/reconstruct", image_bytes(side, side + 3))
    assert response.status_code == 200, response.text
    assert png_size(response.content) == (side, side + 3)


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (encode(solid("RGBA", (21, 13), (10, 20, 30, 0)), "PNG"), (21, 13)),
        (encode(solid("LA", (21, 13), (10, 128)), "PNG"), (21, 13)),
        (encode(solid("L", (21, 13), 200), "PNG"), (21, 13)),
        (encode(gray16([0, 1000, 32896, 65535] * 5, rows=8), "PNG"), (20, 8)),
        (encode(palette_with_transparency(9, 6)[0], "PNG", transparency=0), (9, 6)),
        (encode(solid("CMYK", (12, 10), (0, 0, 255, 0)), "JPEG"), (12, 10)),
        (exif_jpeg(6, width=40, height=20), (20, 40)),  # the output follows the displayed orientation
    ],
    ids=["RGBA", "LA", "L", "I;16", "P-transparency", "CMYK-JPEG", "EXIF-6"],
)
def test_reconstruct_modes(client: TestClient, data: bytes, size: tuple[int, int]) -> None:
    response = post_raw(client, "/reconstruct", data)
    assert response.status_code == 200, response.text
    assert png_size(response.content) == size


def test_reconstruct_depends_on_the_image(client: TestClient) -> None:
    a = post_raw(client, "/reconstruct", png(32, 32)).content
    b = post_raw(client, "/reconstruct", encode(Image.fromarray(noise(32, 32)), "PNG")).content
    pa = np.asarray(Image.open(io.BytesIO(a))).astype(int)
    pb = np.asarray(Image.open(io.BytesIO(b))).astype(int)
    assert np.abs(pa - pb).mean() > 1.0


@pytest.mark.parametrize(("width", "height"), [(37, 53), (5, 7)])
def test_reconstruct_json(client: TestClient, denoiser_config: dict[str, Any], width: int, height: int) -> None:
    data = image_bytes(width, height)
    as_png = post_raw(client, "/reconstruct", data).content
    response = post_raw(client, "/reconstruct", data, headers={"accept": "application/json"})
    assert response.status_code == 200, response.text
    body = response.json()
    trained = denoiser_config["weights"]["trained"]
    assert (body["model"], body["version"], body["trained"]) == ("in_autoencoder", DENOISER, trained)
    assert body["media_type"] == "image/png"
    assert body["shape"] == [height, width, 3]
    image = base64.b64decode(body["image"], validate=True)
    assert png_size(image) == (width, height)
    assert image == as_png  # the same PNG, only wrapped


@pytest.mark.parametrize(("width", "height"), [(1, 1), (3, 3), (1, 5000), (5000, 1), (3, 64), (64, 3)])
def test_reconstruct_below_min_side_is_padded(
    client: TestClient, denoiser_config: dict[str, Any], width: int, height: int
) -> None:
    """Every valid image gets an answer at its own size: one smaller than the graph's min_side is
    mirrored out to it and the answer cropped back (1x5000 also runs tiled)."""
    assert min(width, height) < denoiser_config["preprocessing"]["min_side"]
    response = post_raw(client, "/reconstruct", encode(Image.fromarray(noise(width, height)), "PNG"))
    assert response.status_code == 200, response.text
    assert png_size(response.content) == (width, height)


def test_reconstruct_pixel_limit(app_client: ClientFactory, expect_error: ErrorCheck) -> None:
    client = app_client(max_reconstruct_pixels=256)
    assert post_raw(client, "/reconstruct", png(16, 16)).status_code == 200  # exactly the limit
    expect_error(
        post_raw(client, "/reconstruct", png(17, 16)), 413, "17x16", "272", "256", "NORMSERVE_MAX_RECONSTRUCT_PIXELS"
    )
    assert_still_serving(client)


def test_image_pixel_limit_applies_to_every_route(app_client: ClientFactory, expect_error: ErrorCheck) -> None:
    client = app_client(max_image_pixels=1000)
    for route in ROUTES:
        assert post_raw(client, route, png(40, 25)).status_code == 200, route
        expect_error(post_raw(client, route, png(41, 25)), 413, "41x25", "1000")


# -- bad requests, on every route --------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("kwargs", "status", "fragments"), [pytest.param(*c[1:], id=c[0]) for c in BAD_REQUESTS])
def test_bad_request_is_a_json_4xx(
    client: TestClient,
    expect_error: ErrorCheck,
    route: str,
    kwargs: dict[str, Any],
    status: int,
    fragments: tuple[str, ...],
) -> None:
    expect_error(client.post(route, **kwargs), status, *fragments)
    assert_still_serving(client)


@pytest.mark.parametrize("route", ROUTES)
def test_jpeg_truncated_in_its_header_is_400(client: TestClient, expect_error: ErrorCheck, route: str) -> None:
    data = encode(Image.fromarray(noise(64, 64)), "JPEG")[:100]
    expect_error(post_raw(client, route, data, "image/jpeg"), 400, "JPEG")


@pytest.mark.parametrize(
    ("url", "status", "fragments"),
    [
        ("/classify?model=nope", 404, ("'nope'", "gncnn", "in_autoencoder")),
        ("/features?model=nope", 404, ("'nope'",)),
        ("/reconstruct?model=nope", 404, ("'nope'",)),
        ("/classify?version=999", 404, ("no version '999'", "1")),
        ("/features?version=999", 404, ("no version '999'",)),
        ("/reconstruct?version=999", 404, ("no version '999'",)),
        ("/classify?model=gncnn&version=x", 404, ("no version 'x'",)),
        ("/classify?model=in_autoencoder", 400, (f"in_autoencoder/{DENOISER}", "denoising", "classification")),
        ("/features?model=in_autoencoder", 400, ("denoising",)),
        ("/reconstruct?model=gncnn", 400, (f"gncnn/{GNCNN}", "classification", "denoising")),
    ],
)
def test_model_selection_errors(
    client: TestClient, expect_error: ErrorCheck, url: str, status: int, fragments: tuple[str, ...]
) -> None:
    expect_error(post_raw(client, url, png()), status, *fragments)
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("url", "model"),
    [("/classify?model=gncnn&version=1", "gncnn"), ("/reconstruct?model=in_autoencoder&version=1", None)],
)
def test_naming_the_default_model_explicitly_works(client: TestClient, url: str, model: str | None) -> None:
    response = post_raw(client, url, png())
    assert response.status_code == 200, response.text
    if model:
        assert (response.json()["model"], response.json()["version"]) == (model, "1")


@pytest.mark.parametrize("route", ROUTES)
def test_wrong_method_is_a_json_405(client: TestClient, expect_error: ErrorCheck, route: str) -> None:
    expect_error(client.get(route), 405)


def test_unknown_path_is_a_json_404(client: TestClient, expect_error: ErrorCheck) -> None:
    expect_error(client.post("/segment", content=png(), headers={"content-type": "image/png"}), 404)


# -- request body limit ----------------------------------------------------------------------

LIMIT = 4096


@pytest.fixture
def small_body_client(app_client: ClientFactory) -> TestClient:
    return app_client(max_body_bytes=LIMIT)


def test_body_within_limit_is_served(small_body_client: TestClient) -> None:
    data = png(16, 16)
    assert len(data) < LIMIT
    for route in ROUTES:
        assert post_raw(small_body_client, route, data).status_code == 200, route
        assert post_file(small_body_client, route, data).status_code == 200, route


@pytest.mark.parametrize("route", ROUTES)
def test_body_over_limit_with_content_length(
    small_body_client: TestClient, expect_error: ErrorCheck, route: str
) -> None:
    data = encode(Image.fromarray(noise(64, 64)), "PNG")
    response = post_raw(small_body_client, route, data)
    assert response.request.headers["content-length"] == str(len(data))
    expect_error(response, 413, str(len(data)), str(LIMIT))
    expect_error(post_file(small_body_client, route, data), 413, str(LIMIT))
    assert_still_serving(small_body_client)


@pytest.mark.parametrize("route", ROUTES)
def test_body_over_limit_streamed(small_body_client: TestClient, expect_error: ErrorCheck, route: str) -> None:
    # A generator body goes out chunked, with no Content-Length: the limit must hold while reading.
    data = encode(Image.fromarray(noise(64, 64)), "PNG")

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    response = small_body_client.post(route, content=chunks(), headers={"content-type": "image/png"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    expect_error(response, 413, str(LIMIT))
    # The same for a streamed multipart body.
    body, content_type = multipart([("file", "a.png", data)])
    response = small_body_client.post(
        route, content=iter([body[:3000], body[3000:]]), headers={"content-type": content_type}
    )
    expect_error(response, 413, str(LIMIT))
    assert_still_serving(small_body_client)


def test_mpo_phone_jpeg_is_accepted(client: TestClient) -> None:
    """MPO (what phone cameras write: a JPEG photo followed by a preview) is a JPEG: its first
    frame, the photo, is what is classified and reconstructed."""
    photo, preview = Image.fromarray(noise(40, 30)), Image.new("RGB", (8, 6), (255, 0, 0))
    data = encode(photo, "MPO", save_all=True, append_images=[preview])
    opened = Image.open(io.BytesIO(data))
    assert (opened.format, getattr(opened, "n_frames", 1)) == ("MPO", 2)  # really a 2-frame MPO
    classified = post_raw(client, "/classify", data)
    assert classified.status_code == 200, classified.text
    assert classified.json()["input"] == {"width": 40, "height": 30, "format": "MPO"}
    reconstructed = post_raw(client, "/reconstruct", data)
    assert reconstructed.status_code == 200 and png_size(reconstructed.content) == (40, 30)
