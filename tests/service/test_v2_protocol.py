"""v2_protocol.json_arrays: JSON `data` lists become flat arrays a slice at a time, with the values
np.asarray would give; what does not convert is left for decode_inputs to refuse as before."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from normserve.service.v2_protocol import ARRAY_CHUNK, InputTensor, json_arrays


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("FP32", np.random.default_rng(0).random(2 * ARRAY_CHUNK + 5).tolist()),  # three slices
        ("FP32", [1, 2, 3]),  # ints as floats
        ("FP32", [[[0.5, 1.5], [2.5, 3.5]]]),  # nested
        ("INT64", [1, -2, 3]),
        ("BOOL", [True, False]),
        ("FP16", [0.25] * (ARRAY_CHUNK + 1)),
    ],
)
def test_lists_become_the_arrays_np_asarray_gives(datatype: str, values: list[Any]) -> None:
    tensor = InputTensor("x", datatype, [len(values)], values=values)
    json_arrays([tensor])
    expected = np.asarray(values, dtype=tensor.values.dtype).reshape(-1)
    assert isinstance(tensor.values, np.ndarray) and tensor.values.dtype == np.dtype(
        {"FP32": "<f4", "INT64": "<i8", "BOOL": "?", "FP16": "<f2"}[datatype]
    )
    assert np.array_equal(tensor.values, expected)


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("FP32", ["a", 1.0]),
        ("FP32", [1.0, [2.0]]),  # ragged
        ("UINT8", [300]),  # out of range
        ("BYTES", ["aGVsbG8="]),  # base64 files: not numbers
        ("FP32", "not a list"),
    ],
)
def test_what_does_not_convert_is_left_as_sent(datatype: str, values: Any) -> None:
    tensor = InputTensor("x", datatype, [1], values=values)
    json_arrays([tensor])
    assert tensor.values is values
