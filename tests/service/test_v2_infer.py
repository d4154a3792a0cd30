"""Open Inference Protocol v2 `infer`: the real `tritonclient` (sync and aio, binary and JSON
tensors, classification) against the real server over a socket, plus the protocol's error cases."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import shipped
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from fastapi.testclient import TestClient
from images import image_bytes
from servers import running_server
from shipped import DENOISER, GNCNN
from tritonclient.utils import InferenceServerException

from normserve.service.app import create_app
from normserve.service.settings import Settings
from normserve.service.state import server_state

REPO_ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = REPO_ROOT / "model_repository"
LABELS = shipped.config("gncnn")["labels"]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(tmp_path_factory.mktemp("v2") / "server.log") as server:
        yield server.address


@pytest.fixture(scope="module")
def client(server_url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server_url)


@pytest.fixture(scope="module")
def local() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_repository=REPOSITORY, version_policy="all"))) as c:
        yield c


def _input(x: np.ndarray, binary: bool, datatype: str = "FP32") -> triton.InferInput:
    inp = triton.InferInput("image", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def _reference(local: TestClient, x: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
    """The same model through the service's own in-process session, for comparison."""
    model = server_state(local.app).repository.get("gncnn")
    return model.predict({"image": x}, outputs)  # type: ignore[no-any-return]


def test_server_and_model_health_through_tritonclient(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("gncnn") and client.is_model_ready("in_autoencoder", DENOISER)
    meta = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    model = client.get_model_metadata("gncnn")
    assert model["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
    assert [o["name"] for o in model["outputs"]] == ["logits", "p3", "p4", "p5"]


def test_repository_index_through_tritonclient(client: triton.InferenceServerClient) -> None:
    # tritonclient posts an empty body; every version on disk is listed, and by default (Triton's
    # latest:1) only the newest of each model is loaded.
    index = client.get_model_repository_index()
    on_disk = sorted(
        ((m.name, v.name) for m in REPOSITORY.iterdir() if m.is_dir() for v in m.iterdir() if v.name.isdigit()),
        key=lambda nv: (nv[0], int(nv[1])),
    )
    assert [(r["name"], r["version"]) for r in index] == on_disk
    newest = {name: max(int(v) for n, v in on_disk if n == name) for name, _ in on_disk}
    for r in index:
        if int(r["version"]) == newest[r["name"]]:
            assert r["state"] == "READY", r
        else:
            assert r["state"] == "UNAVAILABLE" and "version policy latest:1" in r["reason"], r


def test_model_config_through_tritonclient(client: triton.InferenceServerClient) -> None:
    """What perf_analyzer reads: max_batch_size, inputs and outputs without the batch dim, batching."""
    config = client.get_model_config("gncnn")
    assert config == client.get_model_config("gncnn", GNCNN)
    assert config["name"] == "gncnn" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 32
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("image", "TYPE_FP32", [3, -1, -1])]
    assert [(o["name"], o["dims"]) for o in config["output"]] == [
        ("logits", [10]),
        ("p3", [64, -1, -1]),
        ("p4", [128, -1, -1]),
        ("p5", [256, -1, -1]),
    ]
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 64
    with pytest.raises(InferenceServerException, match="not found") as info:
        client.get_model_config("nope")
    assert info.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (4, 3, 32, 32), (2, 3, 37, 53)])
def test_classifier_outputs_match_the_model(
    client: triton.InferenceServerClient, local: TestClient, binary: bool, shape: tuple[int, ...]
) -> None:
    x = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    wanted = ["logits", "p4"]
    result = client.infer(
        "gncnn",
        [_input(x, binary)],
        outputs=[triton.InferRequestedOutput(n, binary_data=binary) for n in wanted],
        request_id=f"req-{binary}",
    )
    ref = _reference(local, x, wanted)
    for name in wanted:
        np.testing.assert_allclose(result.as_numpy(name), ref[name], atol=1e-5)
    response = result.get_response()
    assert response["id"] == f"req-{binary}"
    assert [o["name"] for o in response["outputs"]] == wanted  # only what was asked for
    assert response["model_name"] == "gncnn" and response["model_version"] == GNCNN


@pytest.mark.parametrize("binary", [True, False])
def test_classification_extension(client: triton.InferenceServerClient, local: TestClient, binary: bool) -> None:
    x = np.random.default_rng(7).random((3, 3, 32, 32), dtype=np.float32)
    out = triton.InferRequestedOutput("logits", binary_data=binary, class_count=4)
    got = client.infer("gncnn", [_input(x, binary)], outputs=[out]).as_numpy("logits")
    assert got.shape == (3, 4)
    logits = _reference(local, x, ["logits"])["logits"]
    for row, scores in zip(got, logits, strict=True):
        parsed = [(s.decode() if isinstance(s, bytes) else s).split(":") for s in row]
        indices = [int(p[1]) for p in parsed]
        assert indices == list(np.argsort(-scores, kind="stable")[:4])
        assert [p[2] for p in parsed] == [LABELS[i] for i in indices]
        np.testing.assert_allclose([float(p[0]) for p in parsed], scores[indices], atol=1e-5)


def test_denoiser_through_versioned_route(client: triton.InferenceServerClient, local: TestClient) -> None:
    x = np.random.default_rng(3).random((2, 3, 37, 53), dtype=np.float32)
    got = client.infer("in_autoencoder", [_input(x, True)], model_version=DENOISER).as_numpy("reconstruction")
    ref = server_state(local.app).repository.get("in_autoencoder").predict({"image": x})["reconstruction"]
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_aio_client(server_url: str) -> None:
    async def run() -> tuple[np.ndarray, bool]:
        client = triton_aio.InferenceServerClient(server_url)
        try:
            x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
            inp = triton_aio.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            results = await asyncio.gather(*[client.infer("gncnn", [inp]) for _ in range(4)])
            return results[0].as_numpy("logits"), await client.is_server_ready()
        finally:
            await client.close()

    logits, ready = asyncio.run(run())
    assert logits.shape == (2, 10) and ready


@pytest.mark.parametrize(
    ("datatype", "shape", "message"),
    [
        ("FP64", (1, 3, 32, 32), "datatype FP64"),
        ("FP32", (1, 4, 32, 32), "shape"),
        ("FP32", (3, 32, 32), "shape"),
    ],
)
def test_tritonclient_sees_clear_errors(
    client: triton.InferenceServerClient, datatype: str, shape: tuple[int, ...], message: str
) -> None:
    x = np.zeros(shape, dtype=np.float64 if datatype == "FP64" else np.float32)
    with pytest.raises(InferenceServerException, match=message) as info:
        client.infer("gncnn", [_input(x, True, datatype)])
    assert info.value.status() == "400"
    assert client.is_server_ready()


def _post(local: TestClient, body: bytes, header_len: int | None = None, model: str = "gncnn") -> httpx.Response:
    headers = {} if header_len is None else {"Inference-Header-Content-Length": str(header_len)}
    return local.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def _json_request(shape: list[int], **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "image", "shape": shape, "datatype": "FP32", **extra}]}


def test_nested_and_flat_json_data_agree(local: TestClient) -> None:
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    flat = _post(local, json.dumps(_json_request([1, 3, 8, 8], data=x.ravel().tolist())).encode())
    nested = _post(local, json.dumps(_json_request([1, 3, 8, 8], data=x.tolist())).encode())
    assert flat.status_code == nested.status_code == 200
    assert flat.json()["outputs"] == nested.json()["outputs"]


BAD_BODIES = {
    "not json": (b"hello", None, "not valid JSON"),
    "empty": (b"", None, "empty inference request"),
    "deeply nested": (b"[" * 5000 + b"]" * 5000, None, "not valid JSON"),
    "no inputs": (b'{"outputs": []}', None, "inputs"),
    "wrong input name": (
        json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}).encode(),
        None,
        "unknown",
    ),
    "value count": (json.dumps(_json_request([1, 3, 8, 8], data=[0.5] * 10)).encode(), None, "10 values"),
    "strings as data": (json.dumps(_json_request([1, 3, 1, 1], data=["a", "b", "c"])).encode(), None, "not a"),
    "nan": (
        b'{"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": ['
        + b",".join([b"NaN"] * 192)
        + b"]}]}",
        None,
        "JSON",
    ),
    "unknown output": (
        json.dumps({**_json_request([1, 3, 8, 8], data=[0.0] * 192), "outputs": [{"name": "p9"}]}).encode(),
        None,
        "p9",
    ),
    "classification on p3": (
        json.dumps(
            {
                **_json_request([1, 3, 8, 8], data=[0.0] * 192),
                "outputs": [{"name": "p3", "parameters": {"classification": 2}}],
            }
        ).encode(),
        None,
        "classification",
    ),
    "header longer than body": (b"{}", 10, "only 2 bytes"),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_bad_requests_are_400_with_a_reason(local: TestClient, case: str) -> None:
    body, header_len, message = BAD_BODIES[case]
    r = _post(local, body, header_len)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def _binary_request(shape: list[int], size: int, payload: bytes) -> tuple[bytes, int]:
    header = json.dumps(_json_request(shape, parameters={"binary_data_size": size})).encode()
    return header + payload, len(header)


@pytest.mark.parametrize(
    ("size", "payload_len", "message"),
    [
        (192 * 4 - 4, 192 * 4 - 4, "binary_data_size"),  # size disagrees with the shape
        (192 * 4, 100, "needs"),  # section shorter than declared
        (192 * 4, 192 * 4 + 8, "not claimed"),  # trailing bytes would be silently dropped
    ],
)
def test_binary_byte_counts_are_checked(local: TestClient, size: int, payload_len: int, message: str) -> None:
    body, n = _binary_request([1, 3, 8, 8], size, b"\0" * payload_len)
    r = _post(local, body, n)
    assert r.status_code == 400 and message in r.json()["error"]


def test_binary_output_on_request_level(local: TestClient) -> None:
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    body, n = _binary_request([1, 3, 8, 8], x.nbytes, x.tobytes())
    req = json.loads(body[:n])
    req["parameters"] = {"binary_data_output": True}
    req["outputs"] = [{"name": "logits"}]
    header = json.dumps(req).encode()
    r = _post(local, header + x.tobytes(), len(header))
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    hlen = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:hlen])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 40
    logits = np.frombuffer(r.content[hlen:], dtype="<f4")
    np.testing.assert_allclose(logits, _reference(local, x, ["logits"])["logits"].ravel(), atol=1e-5)


def test_unknown_model_and_version_are_404(local: TestClient) -> None:
    body = json.dumps(_json_request([1, 3, 8, 8], data=[0.0] * 192)).encode()
    assert local.post("/v2/models/nope/infer", content=body).status_code == 404
    r = local.post("/v2/models/gncnn/versions/99/infer", content=body)
    assert r.status_code == 404 and "version" in r.json()["error"]


def test_denoiser_input_below_min_side_is_400(local: TestClient) -> None:
    r = _post(local, json.dumps(_json_request([1, 3, 4, 4], data=[0.0] * 48)).encode(), model="in_autoencoder")
    assert r.status_code == 400 and "at least 5" in r.json()["error"]


def _bytes_request(data: object, shape: list[int], **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "image", "shape": shape, "datatype": "BYTES", "data": data, **extra}]}


def _png_b64(side: int = 12) -> str:
    return base64.b64encode(image_bytes(side, side)).decode()


ENCODED_IMAGE_ERRORS = {
    "not base64": (_bytes_request(["not base64!"], [1]), "gncnn", 400, "base64"),
    "not an image": (_bytes_request([base64.b64encode(b"hello").decode()], [1]), "gncnn", 400, "not a decodable image"),
    "shape is not [N]": (_bytes_request([_png_b64()], [1, 1]), "gncnn", 400, "shape [N]"),
    "count differs from shape": (_bytes_request([_png_b64()], [2]), "gncnn", 400, "1 BYTES elements"),
    "native-size model takes no files": (_bytes_request([_png_b64()], [1]), "in_autoencoder", 400, "datatype BYTES"),
    "more images than max_batch_size": (_bytes_request([_png_b64()] * 33, [33]), "gncnn", 400, "max_batch_size"),
}


@pytest.mark.parametrize("case", ENCODED_IMAGE_ERRORS)
def test_encoded_image_errors(local: TestClient, case: str) -> None:
    body, model, status, message = ENCODED_IMAGE_ERRORS[case]
    r = _post(local, json.dumps(body).encode(), model=model)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_encoded_images_in_the_binary_section_need_exact_lengths(local: TestClient) -> None:
    png = image_bytes(12, 12)
    raw = struct.pack("<I", len(png)) + png
    for payload, ok in ((raw, True), (raw[:-1], False), (raw + b"\0\0", False)):
        header = json.dumps(_bytes_request(None, [1], parameters={"binary_data_size": len(payload)})).encode()
        r = _post(local, header + payload, len(header))
        assert (r.status_code == 200) == ok, r.text


@pytest.mark.parametrize("value", [b"\xb2", b"1\xb9", b"-5", b"12a", b""])  # latin-1 "²", "1¹": isdigit() is true
def test_header_length_not_ascii_digits_is_400(local: TestClient, value: bytes) -> None:
    body = json.dumps(_json_request([1, 3, 8, 8], data=[0.0] * 192)).encode()
    r = local.post("/v2/models/gncnn/infer", content=body, headers=[(b"inference-header-content-length", value)])
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"], r.text


def test_large_json_is_parsed_in_a_thread_with_the_same_answer(local: TestClient) -> None:
    """A JSON part over INLINE_JSON_BYTES goes through the thread (routes/v2.py) and answers as
    the inline path does: the same request padded with whitespace past the threshold."""
    from normserve.service.routes.v2 import INLINE_JSON_BYTES

    x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    small = json.dumps(_json_request([1, 3, 32, 32], data=x.ravel().tolist())).encode()
    large = small + b" " * (INLINE_JSON_BYTES + 1 - len(small))
    assert len(small) <= INLINE_JSON_BYTES < len(large)
    a, b = _post(local, small), _post(local, large)
    assert a.status_code == b.status_code == 200, b.text
    assert a.json()["outputs"] == b.json()["outputs"]
    bad = _post(local, large[:-1] + b"x")  # errors from the thread are the same 400s
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]


def _watch_loop(monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, bool]:
    """Replace v2_protocol's `names` with wrappers that record whether each was called in a thread
    where an event loop runs (True) or in a worker thread (False)."""
    from normserve.service import v2_protocol

    on_loop: dict[str, bool] = {}

    def watched(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop[name] = True
            except RuntimeError:
                on_loop[name] = False
            return fn(*args)

        return call

    for name in names:
        monkeypatch.setattr(v2_protocol, name, watched(name, getattr(v2_protocol, name)))
    return on_loop


def test_large_json_is_parsed_and_made_arrays_off_the_event_loop(
    local: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both steps that hold the GIL for a large JSON part, the parse and the lists becoming arrays,
    run where no event loop runs (a thread), and the arrays reach the model as sent."""
    from normserve.service.routes.v2 import INLINE_JSON_BYTES

    on_loop = _watch_loop(monkeypatch, "parse_request", "json_arrays")
    x = np.random.default_rng(3).random((1, 3, 64, 64), dtype=np.float32)
    body = json.dumps(_json_request([1, 3, 64, 64], data=x.ravel().tolist())).encode()
    assert len(body) > INLINE_JSON_BYTES
    r = _post(local, body)
    assert r.status_code == 200, r.text
    assert on_loop == {"parse_request": False, "json_arrays": False}
    binary = json.dumps(_json_request([1, 3, 64, 64], parameters={"binary_data_size": x.nbytes})).encode()
    expected = _post(local, binary + x.tobytes(), header_len=len(binary))
    assert r.json()["outputs"] == expected.json()["outputs"]


@pytest.mark.parametrize(("side", "off_loop"), [(64, True), (16, False)])
def test_a_large_answer_is_encoded_off_the_event_loop(
    local: TestClient, monkeypatch: pytest.MonkeyPatch, side: int, off_loop: bool
) -> None:
    """The feature maps of a 64 x 64 input (112 values a pixel: 460,000 numbers printed as JSON)
    are encoded in a thread; at the 384 x 384 limit, 16.5 million, they took 650 ms on the loop. A
    small answer (16 x 16) is encoded on the loop. Both print the values the binary outputs carry."""
    x = np.random.default_rng(4).random((1, 3, side, side), dtype=np.float32)
    header = json.dumps(_json_request(list(x.shape), parameters={"binary_data_size": x.nbytes})).encode()
    on_loop = _watch_loop(monkeypatch, "encode_response")
    r = _post(local, header + x.tobytes(), header_len=len(header))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    assert on_loop == {"encode_response": not off_loop}
    as_binary = json.dumps(
        {
            **_json_request(list(x.shape), parameters={"binary_data_size": x.nbytes}),
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    b = _post(local, as_binary + x.tobytes(), header_len=len(as_binary))
    start = int(b.headers["inference-header-content-length"])
    for sent, out in zip(r.json()["outputs"], json.loads(b.content[:start])["outputs"], strict=True):
        size = out["parameters"]["binary_data_size"]
        raw = np.frombuffer(b.content[start : start + size], "<f4")
        start += size
        assert sent["name"] == out["name"] and sent["shape"] == out["shape"]
        assert np.array_equal(np.asarray(sent["data"], np.float32), raw)
    assert start == len(b.content)


def test_json_part_over_its_limit_is_413_and_binary_is_not(app_client: Callable[..., TestClient]) -> None:
    """The JSON part has a limit of its own (parsing it holds the worker); the same tensor sent as
    binary data, a larger body, is accepted."""
    client = app_client(max_json_bytes=64 * 1024)
    x = np.random.default_rng(2).random((1, 3, 64, 64), dtype=np.float32)
    as_json = json.dumps(_json_request([1, 3, 64, 64], data=x.ravel().tolist())).encode()
    assert len(as_json) > 64 * 1024
    r = _post(client, as_json)
    assert r.status_code == 413 and "NORMSERVE_MAX_JSON_BYTES" in r.json()["error"] and "binary" in r.json()["error"]
    header = json.dumps(_json_request([1, 3, 64, 64], parameters={"binary_data_size": x.nbytes})).encode()
    assert _post(client, header + x.tobytes(), header_len=len(header)).status_code == 200
