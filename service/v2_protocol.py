"""Open Inference Protocol v2 `infer`: request parsing and response encoding, including the
binary tensor data extension and the classification extension (as Triton and KServe speak them).

Request body: JSON, optionally followed by raw tensor bytes; the header
`Inference-Header-Content-Length` says where the JSON ends. Each input with a
`binary_data_size` parameter takes its bytes from the binary section, in input order, and the
section must be consumed exactly: nothing a client sent is ignored.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, Field, ValidationError

from normserve.contract import ModelConfigFile
from normserve.service.errors import InvalidInput

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "classification"]

# V2 datatype -> numpy dtype (little-endian, as the binary extension specifies)
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    """`{"id": "1", "inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32",
    "data": [...]}], "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}`"""

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


def json_size(body: bytes, header_length: str | None) -> int:
    """How many bytes of the body are the JSON request: all of it, or what the header says."""
    if header_length is None:
        return len(body)
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()):  # "²".isdigit() is true, and int("²") fails
        raise InvalidInput(f"Inference-Header-Content-Length must be a byte count, got {header_length!r}")
    n = int(text)
    if n > len(body):
        raise InvalidInput(f"Inference-Header-Content-Length is {n} but the body has only {len(body)} bytes")
    return n


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """Split the body into the JSON request and its binary section."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        n = json_size(body, header_length)
        json_part, binary = body[:n], body[n:]
    if not json_part.strip():
        raise InvalidInput("empty inference request: expected a JSON object with 'inputs'")
    try:
        raw = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"inference request is not valid JSON: {exc}") from None
    try:
        return InferRequest.model_validate(raw), binary
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidInput(f"invalid inference request: {where}") from None


def decode_inputs(request: InferRequest, binary: bytes, config: ModelConfigFile) -> dict[str, np.ndarray]:
    """Validate every input against the model metadata and turn it into an array."""
    declared = {t.name: t for t in config.inputs}
    sent = [i.name for i in request.inputs]
    if len(set(sent)) != len(sent):
        raise InvalidInput(f"duplicate input names in {sent}")
    unknown = sorted(set(sent) - declared.keys())
    missing = sorted(declared.keys() - set(sent))
    if unknown or missing:
        raise InvalidInput(
            f"model {config.name} takes inputs {sorted(declared)}; unknown: {unknown}, missing: {missing}"
        )
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for inp in request.inputs:
        spec = declared[inp.name]
        if inp.datatype != spec.datatype:
            raise InvalidInput(
                f"input '{inp.name}': datatype {inp.datatype} does not match the model's {spec.datatype}"
            )
        shape = inp.shape
        if len(shape) != len(spec.shape) or any(d < 1 for d in shape):
            raise InvalidInput(f"input '{inp.name}': shape {shape} does not fit the model's {spec.shape} (-1 = any)")
        fixed = [(i, d, s) for i, (d, s) in enumerate(zip(shape, spec.shape, strict=True)) if s != -1 and d != s]
        if fixed:
            raise InvalidInput(
                f"input '{inp.name}': shape {shape} does not fit the model's {spec.shape} (dim {fixed[0][0]})"
            )
        min_side = config.preprocessing.min_side
        if len(shape) == 4 and min(shape[2:]) < min_side:
            raise InvalidInput(f"input '{inp.name}': height and width must be at least {min_side}, got {shape[2:]}")
        dtype = DTYPES[spec.datatype]
        count = math.prod(shape)
        size = inp.parameters.get("binary_data_size")
        if size is not None:
            if inp.data is not None:
                raise InvalidInput(f"input '{inp.name}' has both 'data' and binary_data_size")
            if not isinstance(size, int) or size != count * dtype.itemsize:
                raise InvalidInput(
                    f"input '{inp.name}': binary_data_size {size} does not match shape {shape} of {inp.datatype} "
                    f"({count * dtype.itemsize} bytes)"
                )
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input '{inp.name}': binary section has {len(binary) - offset} bytes left, needs {size}"
                )
            array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
            offset += size
        else:
            if inp.data is None:
                raise InvalidInput(f"input '{inp.name}' has neither 'data' nor a binary_data_size parameter")
            try:
                array = np.asarray(inp.data, dtype=dtype).reshape(-1)
            except (ValueError, TypeError) as exc:
                raise InvalidInput(
                    f"input '{inp.name}': data is not a (nested) list of {inp.datatype} numbers: {exc}"
                ) from None
            if array.size != count:
                raise InvalidInput(f"input '{inp.name}': {array.size} values for shape {shape} ({count} expected)")
        if not np.isfinite(array).all():
            raise InvalidInput(f"input '{inp.name}' contains NaN or infinity")
        arrays[inp.name] = array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data are not claimed by any input's binary_data_size"
        )
    return arrays


def requested_outputs(request: InferRequest, config: ModelConfigFile) -> list[RequestOutput]:
    names = [o.name for o in config.outputs]
    if request.outputs is None:
        return [RequestOutput(name=n) for n in names]
    unknown = sorted({o.name for o in request.outputs} - set(names))
    if unknown:
        raise InvalidInput(f"model {config.name} has no outputs {unknown}; it has {names}")
    for o in request.outputs:
        k = o.parameters.get("classification")
        if k is not None:
            if not config.labels or o.name != "logits":
                raise InvalidInput(
                    f"classification is only available on the 'logits' output of a classifier, not {o.name!r}"
                )
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise InvalidInput(f"output '{o.name}': classification must be a positive integer, got {k!r}")
    return request.outputs


def classify_strings(scores: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Top-k `"score:index:label"` strings per batch row (Triton's classification extension)."""
    rows = scores.reshape(scores.shape[0], -1)
    k = min(k, rows.shape[1])
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    out = [[f"{rows[r, i]:f}:{i}:{labels[i] if i < len(labels) else ''}" for i in top[r]] for r in range(rows.shape[0])]
    return np.array(out, dtype=object)


def _bytes_tensor(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        b = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


def encode_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: list[RequestOutput],
    results: dict[str, np.ndarray],
    labels: list[str] | None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers; binary outputs follow the JSON when any was asked for."""
    binary_default = bool(request.parameters.get("binary_data_output", False))
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for o in outputs:
        value = results[o.name]
        k = o.parameters.get("classification")
        datatype = "FP32"
        if k is not None:
            value = classify_strings(value, int(k), labels or [])
            datatype = "BYTES"
        entry: dict[str, Any] = {"name": o.name, "datatype": datatype, "shape": list(value.shape)}
        if o.parameters.get("binary_data", binary_default):
            raw = _bytes_tensor(value) if datatype == "BYTES" else np.ascontiguousarray(value, dtype="<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = (
                value.reshape(-1).tolist() if datatype == "BYTES" else np.ascontiguousarray(value).reshape(-1)
            )
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request.id is not None:
        body["id"] = request.id
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
