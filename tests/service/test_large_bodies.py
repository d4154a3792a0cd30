"""Large answers built as parts (service/large_bodies.py): the parts join into exactly what a
single orjson.dumps (or tobytes) would give, no part is larger than one chunk's worth (so that
no single call building the body holds the GIL for long), and PartsResponse sends them as one body."""

from __future__ import annotations

import base64
import os
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from normserve.service.large_bodies import (
    B64_CHUNK,
    NUMBERS_CHUNK,
    RAW_CHUNK,
    PartsResponse,
    base64_value,
    json_parts,
    numbers_value,
    raw_parts,
)

PART_BOUND = 4 * B64_CHUNK // 3 + 1024  # one chunk's base64, or the JSON around it


@pytest.mark.parametrize("sizes", [[0], [1], [B64_CHUNK - 1], [B64_CHUNK], [2 * B64_CHUNK + 1], [5, 0, B64_CHUNK + 2]])
def test_parts_join_into_the_json_of_the_whole(sizes: list[int]) -> None:
    buffers = [os.urandom(n) for n in sizes]
    obj = {"model": 'a "quoted" name with "data":"" in it', "levels": [{"name": f"P{i}", "data": ""} for i in sizes]}
    parts = json_parts(obj, "data", [base64_value(b) for b in buffers])
    whole = {
        **obj,
        "levels": [
            {"name": f"P{i}", "data": base64.b64encode(b).decode()} for i, b in zip(sizes, buffers, strict=True)
        ],
    }
    assert b"".join(parts) == orjson.dumps(whole)
    assert max(len(p) for p in parts) <= PART_BOUND


def test_an_array_is_sent_as_its_bytes() -> None:
    a = np.arange(B64_CHUNK, dtype="<f4").reshape(2, -1)  # 4 chunks of bytes
    parts = json_parts({"data": ""}, "data", [base64_value(a)])
    assert np.array_equal(np.frombuffer(base64.b64decode(orjson.loads(b"".join(parts))["data"]), "<f4"), a.ravel())
    assert len(parts) > 4 and max(len(p) for p in parts) <= PART_BOUND


@pytest.mark.parametrize("obj", [{"data": "x"}, {"data": "", "more": {"data": ""}}])
def test_empty_fields_must_match_the_buffers(obj: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="empty 'data' fields for 1 values"):
        json_parts(obj, "data", [base64_value(b"abc")])


@pytest.mark.parametrize("size", [0, 1, NUMBERS_CHUNK, 2 * NUMBERS_CHUNK + 3])
def test_numbers_print_as_orjson_prints_the_array(size: int) -> None:
    a = (np.random.default_rng(size).standard_normal(size) * 1e3).astype(np.float32).reshape(-1, 1)
    parts = numbers_value(a)
    assert b"".join(parts) == orjson.dumps(a.reshape(-1), option=orjson.OPT_SERIALIZE_NUMPY)
    assert max(len(p) for p in parts) <= 16 * NUMBERS_CHUNK  # a float32 prints in at most ~15 characters


@pytest.mark.parametrize("size", [0, 5, RAW_CHUNK // 4, RAW_CHUNK // 4 + 1])
def test_raw_parts_are_the_bytes(size: int) -> None:
    a = np.arange(size, dtype="<f4")[::-1]  # not contiguous: copied in C order
    parts = raw_parts(a)
    assert b"".join(parts) == a.tobytes() and max(len(p) for p in parts) <= RAW_CHUNK


def test_parts_response_sends_one_body_with_its_length() -> None:
    data = os.urandom(3 * B64_CHUNK + 7)
    app = FastAPI()

    @app.get("/big")
    async def big() -> PartsResponse:
        return PartsResponse(
            json_parts({"id": 1, "data": ""}, "data", [base64_value(data)]), media_type="application/json"
        )

    with TestClient(app) as client:
        r = client.get("/big")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    assert base64.b64decode(r.json()["data"]) == data


@pytest.mark.parametrize(("sizes", "messages"), [([10, 20], 1), ([40_000, 40_000], 2), ([5], 1)])
def test_a_small_body_is_sent_as_one_message(sizes: list[int], messages: int) -> None:
    parts = [os.urandom(n) for n in sizes]
    response = PartsResponse(list(parts), media_type="application/octet-stream")
    assert len(response.parts) == messages and b"".join(response.parts) == b"".join(parts)
    assert response.headers["content-length"] == str(sum(sizes))
