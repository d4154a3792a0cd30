"""One worker memory budget for every door, over real sockets against a real `normserve serve`
(one worker, a small budget so that little data fills it; loopback only, every loop bounded):

- request bodies are reserved before they are read: many connections that declare large bodies
  and send them without finishing cannot make the worker hold more than the bodies' share of the
  budget; the rest get 503 + Retry-After, and other clients are served meanwhile;
- gRPC ModelInfer (the real `tritonclient.grpc`) reserves from the same budget as HTTP: it waits
  for memory an HTTP upload holds, then UNAVAILABLE with a `retry-after` trailer, and runs once
  the memory is free; a request larger than the whole budget, or with more pixels than the
  model's largest run, gets RESOURCE_EXHAUSTED naming the setting.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from images import encode, noise
from PIL import Image
from proctree import tree_rss
from servers import Server, running_server
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
BUDGET_MB = 64  # bodies being read may hold half: 32 MiB
WAIT_S = 1.0
BODY_TIMEOUT_S = 4.0
ENV = {
    "NORMSERVE_WORKERS": "1",
    "NORMSERVE_WORKER_MEMORY_MB": str(BUDGET_MB),
    "NORMSERVE_MEMORY_WAIT_S": str(WAIT_S),
    "NORMSERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "NORMSERVE_ACCESS_LOG": "false",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("doors") / "server.log", env=ENV) as s:
        yield s


def _port(server: Server) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def _read_answer(s: socket.socket, seconds: float) -> bytes:
    """What the server sends until it closes the connection (or `seconds` pass)."""
    out, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not data:
            break
        out += data
    return out


def _upload_all_but_one_byte(port: int, declared: int, chunk: bytes) -> socket.socket:
    """POST /classify declaring `declared` bytes and send all but the last one: the server holds
    what it read until the body timeout (or answers before reading, when it has no room, and
    closes: the send fails, and the answer is read then, as httpx and curl do)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % declared)
    sent = 0
    with contextlib.suppress(OSError):  # answered and closed while sending
        while sent < declared - 1:
            n = min(len(chunk), declared - 1 - sent)
            s.sendall(chunk[:n])
            sent += n
    return s


def _chunked_upload_without_end(port: int, total: int, chunk: bytes) -> socket.socket:
    """POST /classify with a chunked body of `total` bytes whose last chunk never comes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
    with contextlib.suppress(OSError):  # answered and closed while sending
        for _ in range(total // len(chunk)):
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    return s


@contextmanager
def _peak_rss(server: Server) -> Iterator[list[int]]:
    """[start-up RSS, peak RSS] of the server tree while the block runs (sampled every 20 ms)."""
    figures, stop = [tree_rss(server.process.pid)] * 2, threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            figures[1] = max(figures[1], tree_rss(server.process.pid))

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        yield figures
    finally:
        stop.set()
        thread.join(10)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def test_large_bodies_sent_slowly_are_reserved_before_they_are_read(server: Server) -> None:
    """24 connections each declare an 8 MiB body and send all of it but the last byte, at once.
    Without reservation the worker would hold all 192 MiB until the body timeout; with it, the
    bodies share of the budget (32 MiB: four of them) is read, every other gets 503 with
    Retry-After after the memory wait, and a client with a small image is served throughout."""
    port, body = _port(server), 8 * MIB
    chunk = bytes(MIB)
    stop = threading.Event()
    served: list[int] = []
    small = encode(Image.fromarray(noise(32, 32)), "PNG")

    def other_client() -> None:
        with httpx.Client(base_url=server.base_url, timeout=10) as c:
            while not stop.wait(0.1):
                served.append(c.post("/classify", content=small, headers={"content-type": "image/png"}).status_code)

    def attacker(i: int) -> bytes:
        if i < 2:  # httpx, which sends its whole body before it reads, gets the answer too
            time.sleep(0.5)  # after the others have taken the room: its (whole) body waits, then 503
            r = httpx.post(
                server.base_url + "/classify",
                content=bytes(body),
                headers={"content-type": "image/png"},
                timeout=BODY_TIMEOUT_S + WAIT_S + 10,
            )
            head = "".join(f"{k}: {v}\r\n" for k, v in r.headers.items())
            return f"HTTP/1.1 {r.status_code} \r\n{head}\r\n".encode() + r.content
        with _upload_all_but_one_byte(port, body, chunk) as s:
            return _read_answer(s, BODY_TIMEOUT_S + WAIT_S + 10)

    other = threading.Thread(target=other_client)
    other.start()
    try:
        with _peak_rss(server) as rss, ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(attacker, range(24)))
    finally:
        stop.set()
        other.join(10)
    start, peak = rss
    statuses = sorted(_status(a) for a in answers)
    refused = [a for a in answers if _status(a) == 503]
    print(f"\nbodies: statuses {statuses}, peak tree RSS +{(peak - start) / MIB:.0f} MiB, others {served}")
    assert set(statuses) <= {503, 408}, statuses
    assert len(refused) >= 24 - 4, statuses  # at most four 8 MiB bodies fit in the bodies' 32 MiB
    for a in refused:
        assert b"retry-after: " in a.lower() and b"NORMSERVE_WORKER_MEMORY_MB" in a, a[:400]
        assert b"connection: close" in a.lower(), a[:400]  # the unread body is not read to be thrown away
    assert peak - start < 100 * MIB, f"peak tree RSS +{(peak - start) / MIB:.0f} MiB (24 x 8 MiB = 192 MiB)"
    assert served and set(served) == {200}, served


LOGITS = [triton_grpc.InferRequestedOutput("logits")]  # all outputs would add the feature maps


def test_chunked_bodies_are_reserved_as_they_arrive(server: Server) -> None:
    """Chunked bodies have no declared length: each is reserved 1 MiB ahead of what arrived, so
    ten 6 MiB chunked uploads that never end fit the bodies' 32 MiB only in part; the others get
    503 with Retry-After once the memory wait is over, and the tree holds what fits."""
    port = _port(server)

    def attacker(_: int) -> bytes:
        with _chunked_upload_without_end(port, 6 * MIB, bytes(MIB)) as s:
            return _read_answer(s, BODY_TIMEOUT_S + WAIT_S + 10)

    with _peak_rss(server) as rss, ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(attacker, range(10)))
    start, peak = rss
    statuses = sorted(_status(a) for a in answers)
    assert set(statuses) <= {503, 408} and statuses.count(503) >= 10 - 32 // 7, statuses
    for a in answers:
        if _status(a) == 503:
            assert b"retry-after: " in a.lower() and b"chunked" in a, a[:400]
    assert peak - start < 64 * MIB, f"peak tree RSS +{(peak - start) / MIB:.0f} MiB (10 x 6 MiB = 60 MiB)"


def _rows(n: int, side: int = 32) -> list[triton_grpc.InferInput]:
    x = np.zeros((n, 3, side, side), np.float32)
    inp = triton_grpc.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def _grpc_error(client: triton_grpc.InferenceServerClient, model: str, inputs: list[triton_grpc.InferInput]) -> str:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs)
    return f"{info.value.status()} {info.value.message()}"


def test_grpc_infer_waits_for_the_memory_an_http_upload_holds(server: Server) -> None:
    """An HTTP upload holds 30 MiB of the worker's 64 MiB; a gRPC batch of 32 rows (an estimated
    ~42 MiB) waits NORMSERVE_MEMORY_WAIT_S, then UNAVAILABLE with retry-after. Once the upload
    is gone, the same call runs."""
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    holder = _upload_all_but_one_byte(_port(server), 30 * MIB, bytes(MIB))  # sent: the server read it
    try:
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            client.infer("gncnn", _rows(32), outputs=LOGITS)
        waited = time.monotonic() - started
        error = info.value
        assert error.status() == "StatusCode.UNAVAILABLE", error
        assert "NORMSERVE_WORKER_MEMORY_MB" in (error.message() or ""), error
        assert waited >= WAIT_S * 0.9
    finally:
        holder.close()
    deadline = time.monotonic() + 10
    while True:  # the upload's reservation is released once the server sees the connection gone
        try:
            result = client.infer("gncnn", _rows(32), outputs=LOGITS)
            break
        except InferenceServerException as exc:
            if exc.status() != "StatusCode.UNAVAILABLE" or time.monotonic() > deadline:
                raise
    assert result.as_numpy("logits").shape == (32, 10)


def test_grpc_retry_after_trailer(server: Server) -> None:
    """The UNAVAILABLE of the memory budget carries `retry-after`, as HTTP's 503 does."""
    holder = _upload_all_but_one_byte(_port(server), 30 * MIB, bytes(MIB))
    try:
        x = np.zeros((32, 3, 32, 32), np.float32)
        request = service_pb2.ModelInferRequest(model_name="gncnn")
        request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(x.tobytes())
        request.outputs.add(name="logits")
        with grpc.insecure_channel(server.grpc_address) as channel, pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    finally:
        holder.close()
    error: Any = info.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(error.trailing_metadata())["retry-after"] == str(int(WAIT_S))


@pytest.mark.parametrize(
    ("model", "side", "setting"),
    [
        ("gncnn", 256, "NORMSERVE_WORKER_MEMORY_MB"),  # 65,536 px: ~85 MB of run, more than the budget
        ("gncnn", 512, "NORMSERVE_MAX_BATCH_PIXELS"),  # over NORMSERVE_MAX_FEATURES_PIXELS (384²)
        ("in_autoencoder", 1024, "NORMSERVE_MAX_BATCH_PIXELS"),  # over one tile batch (2 x 512²)
    ],
)
def test_grpc_infer_larger_than_any_budget_is_resource_exhausted(
    server: Server, model: str, side: int, setting: str
) -> None:
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    error = _grpc_error(client, model, _rows(1, side))
    assert error.startswith("StatusCode.RESOURCE_EXHAUSTED") and setting in error, error
    # and the server goes on serving
    assert client.infer("gncnn", _rows(1)).as_numpy("logits").shape == (1, 10)


def test_nothing_stays_reserved_after_the_doors_tests(server: Server) -> None:
    """Every reservation above was released: a call that needs most of the budget (~42 of 64 MiB)
    runs without waiting."""
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    started = time.monotonic()
    assert client.infer("gncnn", _rows(32), outputs=LOGITS).as_numpy("logits").shape == (32, 10)
    assert time.monotonic() - started < WAIT_S
