"""The gRPC endpoint (Triton's GRPCInferenceService) with the real, unmodified `tritonclient.grpc`
(sync and aio) against the real server over a socket: metadata, config, repository index, infer
with raw and typed contents, the classification extension, encoded images (gRPC and HTTP, binary
and JSON), status codes, the API key, the client's deadline, metrics, the access log, reflection,
and the snippets of docs/grpc.md."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
import tritonclient.http as triton_http
from conftest import make_settings
from fastapi.testclient import TestClient
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from servers import Server, free_port, running_server, start_server, stop_server
from shipped import DENOISER, GNCNN
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from normserve.service.app import create_app
from normserve.service.settings import Settings
from normserve.service.state import server_state

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = REPO_ROOT / "service" / "static" / "samples"
KEY = "grpc-test-key"
MAX_IMAGE_PIXELS = 150 * 150  # the samples are 128 x 128
GRPC_RECEIVE_LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "NORMSERVE_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
        "NORMSERVE_GRPC_MAX_RECEIVE_BYTES": str(GRPC_RECEIVE_LIMIT),
    }
    with running_server(tmp_path_factory.mktemp("grpc") / "server.log", env=env) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(server.grpc_address)


def _input(x: np.ndarray) -> triton_grpc.InferInput:
    inp = triton_grpc.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def _png(path: Path, size: tuple[int, int] | None = None) -> bytes:
    img = Image.open(path).convert("RGB")
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _status(info: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(info.value.status())


def test_health_and_metadata(client: triton_grpc.InferenceServerClient, server: Server) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("gncnn") and client.is_model_ready("gncnn", GNCNN)
    assert not client.is_model_ready("nope")  # as Triton: unknown is not ready
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "normserve" and {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    model = client.get_model_metadata("gncnn", as_json=True)
    http = httpx.get(f"{server.base_url}/v2/models/gncnn").json()
    assert model["name"] == "gncnn" and model["versions"] == http["versions"] and model["platform"] == http["platform"]
    for side in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in model[side]] == [
            (t["name"], t["datatype"], t["shape"]) for t in http[side]
        ]
    assert http["encoded_image_inputs"] == ["image"]


def test_model_config_and_repository_index(client: triton_grpc.InferenceServerClient, server: Server) -> None:
    config = client.get_model_config("gncnn", as_json=True)["config"]
    http = httpx.get(f"{server.base_url}/v2/models/gncnn/config").json()
    assert config["name"] == "gncnn" and config["max_batch_size"] == http["max_batch_size"] == 32
    assert [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in config["input"]] == [
        ("image", "TYPE_FP32", [3, -1, -1])
    ]
    assert [o["name"] for o in config["output"]] == [o["name"] for o in http["output"]]
    assert config["parameters"]["encoded_image_inputs"]["string_value"] == "image"
    assert int(config["dynamic_batching"]["default_queue_policy"]["max_queue_size"]) == 64
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    index = client.get_model_repository_index(as_json=True)["models"]
    http_index = httpx.post(f"{server.base_url}/v2/repository/index").json()
    assert [(r["name"], r["version"], r["state"]) for r in index] == [
        (r["name"], r["version"], r["state"]) for r in http_index
    ]


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (3, 3, 37, 53)])
def test_infer_raw_contents_matches_http(
    client: triton_grpc.InferenceServerClient, server: Server, shape: tuple[int, ...]
) -> None:
    x = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    wanted = ["logits", "p4"]
    result = client.infer(
        "gncnn", [_input(x)], outputs=[triton_grpc.InferRequestedOutput(n) for n in wanted], request_id="r1"
    )
    response = result.get_response()
    assert response.id == "r1" and response.model_name == "gncnn" and response.model_version == GNCNN
    assert [o.name for o in response.outputs] == wanted
    http = triton_http.InferenceServerClient(server.address)
    inp = triton_http.InferInput("image", list(shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    reference = http.infer("gncnn", [inp], outputs=[triton_http.InferRequestedOutput(n) for n in wanted])
    for name in wanted:
        np.testing.assert_allclose(result.as_numpy(name), reference.as_numpy(name), atol=1e-5)


def test_infer_typed_contents(client: triton_grpc.InferenceServerClient, server: Server) -> None:
    """Inputs in InferTensorContents.fp32_contents (tritonclient's own stub; its client always sends raw)."""
    x = np.random.default_rng(5).random((2, 3, 32, 32), dtype=np.float32)
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="gncnn")
        tensor = request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        request.outputs.add(name="logits")
        response = stub.ModelInfer(request)
        logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10)
        reference = client.infer("gncnn", [_input(x)], outputs=[triton_grpc.InferRequestedOutput("logits")])
        np.testing.assert_allclose(logits, reference.as_numpy("logits"), atol=1e-6)
        # both raw and typed contents for one input: refused
        request.raw_input_contents.append(x.tobytes())
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "send one" in str(info.value.details())


def test_classification_extension(client: triton_grpc.InferenceServerClient) -> None:
    x = np.random.default_rng(7).random((3, 3, 32, 32), dtype=np.float32)
    logits = client.infer("gncnn", [_input(x)], outputs=[triton_grpc.InferRequestedOutput("logits")]).as_numpy("logits")
    out = triton_grpc.InferRequestedOutput("logits", class_count=4)
    got = client.infer("gncnn", [_input(x)], outputs=[out]).as_numpy("logits")
    assert got.shape == (3, 4)
    for row, scores in zip(got, logits, strict=True):
        parsed = [s.decode().split(":") for s in row]
        assert [int(p[1]) for p in parsed] == list(np.argsort(-scores, kind="stable")[:4])
        np.testing.assert_allclose([float(p[0]) for p in parsed], np.sort(scores)[::-1][:4], atol=1e-5)


def _classify(server: Server, png: bytes) -> dict[str, float]:
    r = httpx.post(f"{server.base_url}/classify?top_k=10", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return {p["label"]: p["probability"] for p in r.json()["predictions"]}


def _probabilities(logits: np.ndarray, labels: list[str]) -> list[dict[str, float]]:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    return [dict(zip(labels, row.tolist(), strict=True)) for row in p]


@pytest.fixture(scope="module")
def samples(server: Server) -> tuple[list[bytes], list[dict[str, float]], list[str]]:
    """Sample images of other sizes than the model's (so they are resized), and /classify's answer."""
    files = [_png(SAMPLES / name, (40, 30)) for name in ("frog.png", "car.png", "sailboat.png")]
    labels = httpx.get(f"{server.base_url}/v2/models/gncnn").json()["labels"]
    return files, [_classify(server, f) for f in files], labels


def _check_as_classify(logits: np.ndarray, expected: list[dict[str, float]], labels: list[str]) -> None:
    for got, want in zip(_probabilities(logits, labels), expected, strict=True):
        for label, p in want.items():
            assert got[label] == pytest.approx(p, abs=1e-4)


def test_encoded_images_over_grpc_decode_as_classify_does(
    client: triton_grpc.InferenceServerClient, samples: tuple[list[bytes], list[dict[str, float]], list[str]]
) -> None:
    files, expected, labels = samples
    image = triton_grpc.InferInput("image", [len(files)], "BYTES")
    image.set_data_from_numpy(np.array(files, dtype=object))
    result = client.infer("gncnn", [image], outputs=[triton_grpc.InferRequestedOutput("logits")])
    _check_as_classify(result.as_numpy("logits"), expected, labels)


@pytest.mark.parametrize("binary", [True, False])
def test_encoded_images_over_http(
    server: Server, samples: tuple[list[bytes], list[dict[str, float]], list[str]], binary: bool
) -> None:
    files, expected, labels = samples
    http = triton_http.InferenceServerClient(server.address)
    image = triton_http.InferInput("image", [len(files)], "BYTES")
    data = files if binary else [base64.b64encode(f).decode() for f in files]  # JSON: base64 (OVMS)
    image.set_data_from_numpy(np.array(data, dtype=object), binary_data=binary)
    result = http.infer("gncnn", [image], outputs=[triton_http.InferRequestedOutput("logits", binary_data=binary)])
    _check_as_classify(result.as_numpy("logits"), expected, labels)


def test_encoded_images_batch_with_concurrent_requests(
    server: Server, samples: tuple[list[bytes], list[dict[str, float]], list[str]]
) -> None:
    """Concurrent encoded-image requests (aio client) each get their own image's answer."""
    files, expected, labels = samples

    async def run() -> list[np.ndarray]:
        aio = triton_grpc_aio.InferenceServerClient(server.grpc_address)
        try:

            async def one(f: bytes) -> np.ndarray:
                image = triton_grpc_aio.InferInput("image", [1], "BYTES")
                image.set_data_from_numpy(np.array([f], dtype=object))
                result = await aio.infer("gncnn", [image], outputs=[triton_grpc_aio.InferRequestedOutput("logits")])
                return np.asarray(result.as_numpy("logits"))

            return list(await asyncio.gather(*(one(files[i % 3]) for i in range(12))))
        finally:
            await aio.close()

    results = asyncio.run(run())
    for i, logits in enumerate(results):
        _check_as_classify(logits, [expected[i % 3]], labels)


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("unknown model", "StatusCode.NOT_FOUND", "not found"),
        ("wrong datatype", "StatusCode.INVALID_ARGUMENT", "datatype INT32"),
        ("wrong shape", "StatusCode.INVALID_ARGUMENT", "does not fit"),
        ("NaN", "StatusCode.INVALID_ARGUMENT", "NaN"),
        ("too many rows", "StatusCode.INVALID_ARGUMENT", "max_batch_size"),
        ("unknown output", "StatusCode.INVALID_ARGUMENT", "no outputs"),
        ("not an image", "StatusCode.INVALID_ARGUMENT", "not a decodable image"),
        ("image over the pixel limit", "StatusCode.RESOURCE_EXHAUSTED", "NORMSERVE_MAX_IMAGE_PIXELS"),
        ("message over the size limit", "StatusCode.RESOURCE_EXHAUSTED", "larger than max"),
    ],
)
def test_errors_map_to_status_codes(
    client: triton_grpc.InferenceServerClient, case: str, code: str, message: str
) -> None:
    x = np.zeros((1, 3, 32, 32), np.float32)
    model, inputs, outputs = "gncnn", [_input(x)], None
    if case == "unknown model":
        model = "nope"
    elif case == "wrong datatype":
        inputs = [triton_grpc.InferInput("image", [1, 3, 32, 32], "INT32")]
        inputs[0].set_data_from_numpy(x.astype(np.int32))
    elif case == "wrong shape":
        inputs = [_input(np.zeros((1, 4, 32, 32), np.float32))]
    elif case == "NaN":
        inputs = [_input(np.full((1, 3, 32, 32), np.nan, np.float32))]
    elif case == "too many rows":
        inputs = [_input(np.zeros((33, 3, 8, 8), np.float32))]
    elif case == "unknown output":
        outputs = [triton_grpc.InferRequestedOutput("nope")]
    elif case in ("not an image", "image over the pixel limit"):
        data = b"not an image" if case == "not an image" else _png(SAMPLES / "frog.png", (200, 160))
        inputs = [triton_grpc.InferInput("image", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([data], dtype=object))
    elif case == "message over the size limit":
        inputs = [_input(np.zeros((12, 3, 128, 128), np.float32))]  # 2.25 MiB > 2 MiB
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs, outputs=outputs)
    assert _status(info) == code, info.value
    assert message in str(info.value.message())
    assert client.is_server_ready()  # and the server keeps serving


def test_aio_client(server: Server) -> None:
    async def run() -> tuple[bool, list[tuple[int, ...]]]:
        aio = triton_grpc_aio.InferenceServerClient(server.grpc_address)
        try:
            x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
            inp = triton_grpc_aio.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            results = await asyncio.gather(*[aio.infer("gncnn", [inp]) for _ in range(8)])
            return await aio.is_server_ready(), [r.as_numpy("logits").shape for r in results]
        finally:
            await aio.close()

    ready, shapes = asyncio.run(run())
    assert ready and shapes == [(2, 10)] * 8


def test_every_worker_serves_grpc_on_the_shared_port(server: Server) -> None:
    """SO_REUSEPORT: each worker process listens on the one gRPC port."""
    workers = httpx.get(f"{server.base_url}/v2/health/ready").json()["workers"]
    listening = re.findall(r"gRPC \(inference.GRPCInferenceService\) listening on 127.0.0.1:(\d+)", server.log_text())
    assert listening == [str(server.grpc_port)] * workers


def test_metrics_and_access_log_count_grpc(client: triton_grpc.InferenceServerClient, server: Server) -> None:
    client.infer("gncnn", [_input(np.zeros((1, 3, 32, 32), np.float32))], headers={"x-request-id": "grpc-log-1"})
    with pytest.raises(InferenceServerException):
        client.infer("nope", [_input(np.zeros((1, 3, 32, 32), np.float32))])
    metrics = httpx.get(f"{server.base_url}/metrics").text
    route = "/inference.GRPCInferenceService/ModelInfer"
    assert re.search(rf'normserve_requests_total\{{endpoint="{route}",model="gncnn",status="200"\}} [1-9]', metrics)
    assert re.search(rf'normserve_failures_total\{{endpoint="{route}",reason="ModelNotFound"\}} [1-9]', metrics)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in server.log_text().splitlines() if '"request_id":"grpc-log-1"' in line]
        if lines:
            break
        time.sleep(0.1)
    assert lines and lines[0]["method"] == "GRPC" and lines[0]["route"] == route
    assert lines[0]["model"] == "gncnn" and lines[0]["batch_size"] == 1 and lines[0]["grpc_status"] == "OK"


def test_reflection_lists_the_service(server: Server) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in database.get_services()
        # what `grpcurl describe` needs: the file that defines the service, and its imports
        service_file = database.FindFileContainingSymbol("inference.GRPCInferenceService")
        assert service_file.name == "grpc_service.proto" and list(service_file.dependency) == ["model_config.proto"]
        assert database.FindFileByName("model_config.proto").package == "inference"


@pytest.mark.parametrize("snippet", [0, 1])
def test_docs_snippets_run_unmodified(server: Server, snippet: int, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/grpc.md's Python snippets, pointed at this server (the only change: the address)."""
    text = (REPO_ROOT / "docs" / "grpc.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = blocks[snippet].replace("localhost:8001", server.grpc_address)
    exec(compile(code, f"docs/grpc.md snippet {snippet}", "exec"), {})  # run from the repo root (sample path)
    printed = capsys.readouterr().out
    assert re.search(r"b'\d+\.\d+:\d:\w+'", printed), printed


# -- in process: the API key and the deadline, with the model under the test's control ---------


@pytest.fixture
def local_grpc(tmp_path: Path, committed_model_repository: Path) -> Iterator[tuple[TestClient, str]]:
    port = free_port()
    settings = make_settings(
        committed_model_repository, grpc=True, grpc_port=port, api_key=KEY, model_instances=1, version_policy="latest:1"
    )
    with TestClient(create_app(settings)) as c:
        yield c, f"127.0.0.1:{port}"


AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(("headers", "ok"), [(None, False), ({"authorization": "Bearer wrong"}, False), (AUTH, True)])
def test_api_key_as_authorization_metadata(
    local_grpc: tuple[TestClient, str], headers: dict[str, str] | None, ok: bool
) -> None:
    _, address = local_grpc
    client = triton_grpc.InferenceServerClient(address)
    assert client.get_model_metadata("gncnn").name == "gncnn"  # metadata stays open, as on HTTP
    x = _input(np.zeros((1, 3, 32, 32), np.float32))
    if ok:
        assert client.infer("gncnn", [x], headers=headers).as_numpy("logits").shape == (1, 10)
        index = client.get_model_repository_index(headers=headers).models
        assert sorted((m.name, m.version) for m in index if m.state == "READY") == [
            ("gncnn", GNCNN),
            ("in_autoencoder", DENOISER),
        ]
        return
    for call in (
        lambda: client.infer("gncnn", [x], headers=headers),
        lambda: client.get_model_repository_index(headers=headers),
    ):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert _status(info) == "StatusCode.UNAUTHENTICATED" and "API key" in str(info.value.message())


@contextmanager
def _one_call_running(app_client: TestClient, address: str) -> Iterator[tuple[Any, list[int], dict[str, Any]]]:
    """gncnn's single instance busy with a 1-row call the test releases on leaving: (its batcher,
    the rows of every run started, the blocked call's result once it is in)."""
    model = server_state(app_client.app).repository.get("gncnn")
    release, started = threading.Event(), threading.Event()
    runs: list[int] = []
    predict = model.predict

    def gated(inputs: dict[str, np.ndarray], outputs: Any = None, **options: Any) -> Any:
        runs.append(next(iter(inputs.values())).shape[0])
        started.set()
        release.wait(10)
        return predict(inputs, outputs, **options)

    model.predict = gated
    first: dict[str, Any] = {}
    client = triton_grpc.InferenceServerClient(address)

    def blocker() -> None:
        first["result"] = client.infer("gncnn", [_input(np.zeros((1, 3, 32, 32), np.float32))], headers=AUTH)

    thread = threading.Thread(target=blocker)
    thread.start()
    try:
        assert started.wait(10)
        yield model.batcher, runs, first
    finally:
        # The gate stays (released) for the app's life, which is this test's: restoring `predict`
        # here would race a queued call whose run has not started yet, and leave it uncounted.
        release.set()
        thread.join(10)


def _wait_for(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_deadline_drops_work_that_has_not_started(local_grpc: tuple[TestClient, str]) -> None:
    """A request queued behind a running one whose deadline passes gets DEADLINE_EXCEEDED and is
    never run; the running one finishes."""
    app_client, address = local_grpc
    client = triton_grpc.InferenceServerClient(address)
    with _one_call_running(app_client, address) as (batcher, runs, first):
        with pytest.raises(InferenceServerException) as info:
            client.infer("gncnn", [_input(np.zeros((2, 3, 32, 32), np.float32))], headers=AUTH, client_timeout=0.5)
        assert _status(info) == "StatusCode.DEADLINE_EXCEEDED"
        _wait_for(lambda: batcher.queued == 0)  # the server drops it when the deadline passes
        assert batcher.queued == 0
    assert first["result"].as_numpy("logits").shape == (1, 10)
    assert runs == [1]  # the 2-row request never ran


def test_full_queue_is_unavailable_with_retry_after(local_grpc: tuple[TestClient, str]) -> None:
    """Triton's answer to a full queue: UNAVAILABLE; the trailer `retry-after` is HTTP's Retry-After."""
    app_client, address = local_grpc
    x = np.zeros((1, 3, 32, 32), np.float32)
    with _one_call_running(app_client, address) as (batcher, runs, _):
        batcher.policy = dataclasses.replace(batcher.policy, max_queue_size=1)
        queued: dict[str, Any] = {}
        waiting = threading.Thread(
            target=lambda: queued.update(
                result=triton_grpc.InferenceServerClient(address).infer("gncnn", [_input(x)], headers=AUTH)
            )
        )
        waiting.start()
        _wait_for(lambda: batcher.queued == 1)
        with grpc.insecure_channel(address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelInferRequest(model_name="gncnn")
            request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
            request.raw_input_contents.append(x.tobytes())
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    waiting.join(10)
    error: Any = info.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "overloaded" in error.details()
    assert dict(error.trailing_metadata())["retry-after"] == "1"
    assert queued["result"].as_numpy("logits").shape == (1, 10)  # the queued one ran once released
    assert runs == [1, 1]


# -- graceful shutdown ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_sigterm_drains_grpc_calls_in_flight(tmp_path: Path) -> None:
    """On SIGTERM the gRPC server takes no new calls, and the calls it had taken finish with OK:
    no call the server logged ends in an error, calls in flight at the signal are answered, and
    the process exits cleanly within the grace period."""
    grace = 20.0
    server = start_server(tmp_path / "server.log", "--workers", "1", env={"NORMSERVE_SHUTDOWN_GRACE_S": str(grace)})
    stop = threading.Event()
    outcomes: list[tuple[int, float, str]] = []  # (client, finished, "OK" or the status code)
    x = np.random.default_rng(0).random((1, 3, 192, 192), dtype=np.float32)  # the denoiser: a few ms of work

    def run(index: int) -> None:
        client = triton_grpc.InferenceServerClient(server.grpc_address)
        inp = triton_grpc.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        while not stop.is_set():
            try:
                client.infer("in_autoencoder", [inp], client_timeout=30)
            except InferenceServerException as exc:
                outcomes.append((index, time.monotonic(), str(exc.status())))
                return
            outcomes.append((index, time.monotonic(), "OK"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(o[2] == "OK" for o in outcomes) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(o[2] == "OK" for o in outcomes), outcomes
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        returncode = server.process.wait(grace + 15)
        exited_after = time.monotonic() - signalled
        stop.set()
        for t in threads:
            t.join(30)
        log = server.log_text()
        served = [json.loads(line) for line in log.splitlines() if '"method":"GRPC"' in line]
        assert served and all(r["grpc_status"] == "OK" for r in served), [r for r in served if r["grpc_status"] != "OK"]
        assert any(status == "OK" and at > signalled for _, at, status in outcomes), "no call in flight was answered"
        # Calls the server turned away (never logged above, so never started): refused
        # connections (UNAVAILABLE) or streams gRPC cancels while it stops (CANCELLED).
        refused = {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}
        assert {status for _, _, status in outcomes} <= {"OK", *refused}, outcomes
        assert exited_after < grace and returncode in (0, -signal.SIGTERM), log
        assert "normserve: stopped" in log and "Traceback" not in log, log
    finally:
        stop.set()
        stop_server(server)
        for t in threads:
            t.join(30)


def test_a_taken_grpc_port_stops_start_up_with_the_setting_named(committed_model_repository: Path) -> None:
    """A port held by a process that does not share it (no SO_REUSEPORT): the worker does not
    start (so it never reports ready) and the error names the setting."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(committed_model_repository, grpc=True, grpc_port=port, version_policy="latest:1")
        with pytest.raises(RuntimeError, match="NORMSERVE_GRPC_PORT"), TestClient(create_app(settings)):
            pass


def test_encoded_images_batch_with_tensor_requests(
    committed_model_repository: Path, samples: tuple[list[bytes], list[dict[str, float]], list[str]]
) -> None:
    """Three encoded-image calls and one FP32 tensor call, sent together, run as one batch of four
    rows (max_batch_size 4 flushes it; the long queue delay makes waiting for all four certain)."""
    files, expected, labels = samples
    port = free_port()
    settings = make_settings(
        committed_model_repository,
        grpc=True,
        grpc_port=port,
        version_policy="latest:1",
        max_batch_size=4,
        max_queue_delay_ms=20_000,
    )
    x = np.random.default_rng(3).random((1, 3, 32, 32), dtype=np.float32)
    with TestClient(create_app(settings)) as app_client:
        registry = server_state(app_client.app).metrics.registry

        def batches() -> tuple[float, float]:
            labels_ = {"model": "gncnn"}
            return (
                registry.get_sample_value("normserve_batch_size_count", labels_) or 0.0,
                registry.get_sample_value("normserve_batch_size_sum", labels_) or 0.0,
            )

        async def run() -> list[np.ndarray]:
            aio = triton_grpc_aio.InferenceServerClient(f"127.0.0.1:{port}")
            try:

                async def one(i: int) -> np.ndarray:
                    if i < 3:
                        inp = triton_grpc_aio.InferInput("image", [1], "BYTES")
                        inp.set_data_from_numpy(np.array([files[i]], dtype=object))
                    else:
                        inp = triton_grpc_aio.InferInput("image", list(x.shape), "FP32")
                        inp.set_data_from_numpy(x)
                    out = [triton_grpc_aio.InferRequestedOutput("logits")]
                    return np.asarray((await aio.infer("gncnn", [inp], outputs=out)).as_numpy("logits"))

                return list(await asyncio.gather(*(one(i) for i in range(4))))
            finally:
                await aio.close()

        before = batches()
        results = asyncio.run(run())
        after = batches()
        reference = server_state(app_client.app).repository.get("gncnn").predict({"image": x}, ["logits"])
    assert (after[0] - before[0], after[1] - before[1]) == (1, 4)  # one run of four rows
    for i in range(3):
        _check_as_classify(results[i], [expected[i]], labels)
    np.testing.assert_allclose(results[3], reference["logits"], atol=1e-5)


def test_grpc_calls_count_as_activity_for_the_memory_trimmer(tmp_path: Path, committed_model_repository: Path) -> None:
    """A worker that served only gRPC calls gives its memory back once quiet, as after HTTP ones
    (service/memory.py); a call in flight counts as activity."""
    port = free_port()
    settings = make_settings(
        committed_model_repository, grpc=True, grpc_port=port, memory_trim_idle_s=0.2, version_policy="latest:1"
    )
    with TestClient(create_app(settings)) as c:
        trimmer: Any = server_state(c.app).trimmer
        time.sleep(0.6)
        assert trimmer.trims == 0  # nothing happened yet
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.infer("gncnn", [_input(np.zeros((1, 3, 32, 32), np.float32))]).as_numpy("logits").shape == (1, 10)
        _wait_for(lambda: trimmer.trims == 1)
        assert trimmer.trims == 1


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, 20),
        ({"worker_memory_mb": 64}, 4),
        ({"grpc_max_receive_bytes": 4 << 20}, 160),
        ({"grpc_max_concurrent_rpcs": 3}, 3),
    ],
)
def test_concurrent_rpcs_default_from_the_budget(overrides: dict[str, int], expected: int) -> None:
    assert Settings(**overrides).grpc_concurrent_rpcs() == expected  # type: ignore[arg-type]


def test_calls_past_the_concurrency_limit_are_resource_exhausted(
    tmp_path: Path, committed_model_repository: Path
) -> None:
    """gRPC receives a whole message before the handler can reserve it, so the calls one worker
    serves at once are bounded: one past NORMSERVE_GRPC_MAX_CONCURRENT_RPCS is refused with
    RESOURCE_EXHAUSTED (the real tritonclient sees it), and the server serves again afterwards."""
    port = free_port()
    settings = make_settings(
        committed_model_repository,
        grpc=True,
        grpc_port=port,
        api_key=KEY,
        model_instances=1,
        version_policy="latest:1",
        grpc_max_concurrent_rpcs=1,
    )
    address = f"127.0.0.1:{port}"
    x = _input(np.zeros((1, 3, 32, 32), np.float32))
    with TestClient(create_app(settings)) as app_client:
        client = triton_grpc.InferenceServerClient(address)
        with _one_call_running(app_client, address) as (_, runs, first):
            with pytest.raises(InferenceServerException) as info:
                client.infer("gncnn", [x], headers=AUTH)
            assert _status(info) == "StatusCode.RESOURCE_EXHAUSTED"
        assert first["result"].as_numpy("logits").shape == (1, 10)
        assert runs == [1]  # the refused call never ran
        assert client.infer("gncnn", [x], headers=AUTH).as_numpy("logits").shape == (1, 10)
