"""The naive baseline serves real requests, doing the same model work as normserve."""

from __future__ import annotations

import io

import numpy as np
import orjson
import pytest
from PIL import Image

from normserve.bench.payloads import Workload
from normserve.bench.servers import ServerProcess, post


def test_naive_classify_matches_normserve(
    naive_server: ServerProcess, normserve_server: ServerProcess, workloads: dict[str, Workload]
) -> None:
    w = workloads["classify"]
    status, ctype, body = post(naive_server.base_url, w.path, w.body, w.headers)
    assert status == 200 and ctype.startswith("application/json"), body
    naive = orjson.loads(body)["predictions"]
    status, _, body = post(normserve_server.base_url, w.path, w.body, w.headers)
    assert status == 200, body
    ours = orjson.loads(body)["predictions"]
    # A 32×32 image needs no resize, so both run the model on the same tensor.
    assert [p["label"] for p in naive] == [p["label"] for p in ours]
    assert [p["probability"] for p in naive] == pytest.approx([p["probability"] for p in ours], abs=1e-5)


def test_naive_reconstruct_answers_a_png_of_the_input_size(
    naive_server: ServerProcess, workloads: dict[str, Workload]
) -> None:
    w = workloads["reconstruct256"]
    status, ctype, body = post(naive_server.base_url, w.path, w.body, w.headers)
    assert status == 200 and ctype == "image/png", body[:200]
    img = Image.open(io.BytesIO(body))
    assert img.format == "PNG" and img.size == (256, 256) and img.mode == "RGB"
    assert np.asarray(img).std() > 0
