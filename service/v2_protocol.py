"""Open Inference Protocol v2 `infer`: request parsing and response encoding, including the
binary tensor data extension and the classification extension (as Triton and KServe speak them).

Request body: JSON, optionally followed by raw tensor bytes; the header
`Inference-Header-Content-Length` says where the JSON ends. Each input with a
`binary_data_size` parameter takes its bytes from the binary section, in input order, and the
section must be consumed exactly: nothing a client sent is ignored.

Both protocols meet here: HTTP (`parse_request`, `http_tensors`) and gRPC (service/grpc_server.py)
turn what they received into `InputTensor`s and `RequestOutput`s; `decode_inputs`,
`requested_outputs` and `output_tensors` check and convert them the same way for both, and
service/v2_infer.py runs them. An image model's 4-D input also takes encoded image files
(BYTES, shape [N]; `encoded_image_inputs`), as OpenVINO Model Server's binary inputs do.
"""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, Field, ValidationError

from normserve.contract import LOGITS_OUTPUT, ModelConfigFile, TensorSpec
from normserve.service.errors import InvalidInput
from normserve.service.large_bodies import json_parts, numbers_value, raw_parts
from normserve.service.tasks import top_k

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


@dataclass
class InputTensor:
    """One input as a request carried it, whatever the protocol: `raw` little-endian bytes (the
    binary extension, gRPC's raw_input_contents), or `values`, a (nested) list (JSON `data`,
    gRPC's typed contents). BYTES tensors carry `elements` instead, one bytes object each."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | memoryview | None = None
    values: Any = None
    elements: list[bytes] | None = None


@dataclass
class DecodedInputs:
    """Numeric inputs as arrays; encoded-image inputs as their files, decoded later (off the loop)."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    images: dict[str, list[bytes]] = field(default_factory=dict)


def bytes_elements(name: str, raw: bytes | memoryview, count: int) -> list[bytes]:
    """A BYTES tensor's raw form (each element a 4-byte little-endian length, then its bytes)
    split into `count` elements; the bytes must be consumed exactly."""
    view = memoryview(raw)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInput(f"input '{name}': BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + size > len(view):
            raise InvalidInput(
                f"input '{name}': BYTES element {len(elements)} claims {size} bytes, {len(view) - offset} left"
            )
        elements.append(bytes(view[offset : offset + size]))
        offset += size
    if len(elements) != count:
        raise InvalidInput(f"input '{name}': {len(elements)} BYTES elements for shape of {count} elements")
    return elements


def http_tensors(request: InferRequest, binary: bytes) -> list[InputTensor]:
    """The inputs of an HTTP request: each with a `binary_data_size` takes its bytes from the
    binary section, in input order, and the section must be consumed exactly."""
    tensors: list[InputTensor] = []
    offset = 0
    view = memoryview(binary)
    for inp in request.inputs:
        tensor = InputTensor(inp.name, inp.datatype, inp.shape)
        size = inp.parameters.get("binary_data_size")
        if size is not None:
            if inp.data is not None:
                raise InvalidInput(f"input '{inp.name}' has both 'data' and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"input '{inp.name}': binary_data_size must be a byte count, got {size!r}")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input '{inp.name}': binary section has {len(binary) - offset} bytes left, needs {size}"
                )
            tensor.raw = view[offset : offset + size]
            offset += size
        elif inp.data is None:
            raise InvalidInput(f"input '{inp.name}' has neither 'data' nor a binary_data_size parameter")
        else:
            tensor.values = inp.data  # BYTES in JSON: base64 strings, decoded once the input is known
        tensors.append(tensor)
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data are not claimed by any input's binary_data_size"
        )
    return tensors


# Values converted per call: a list of Python numbers becomes an array in one C call that holds the
# GIL (~14 ms for 466,000 floats, the largest JSON tensor NORMSERVE_MAX_JSON_BYTES allows); in
# slices of this many, each call is ~1 ms and the event loop gets the GIL in between.
ARRAY_CHUNK = 1 << 16


def json_arrays(tensors: list[InputTensor]) -> None:
    """Turn the JSON `data` of each numeric input into a flat array of its datatype, in place, a
    slice at a time (run in a thread for a large request: routes/v2.py). Data that does not
    convert is left as it is: `decode_inputs` then refuses it with the error it always gives."""
    for tensor in tensors:
        dtype = DTYPES.get(tensor.datatype)
        values = tensor.values
        if dtype is None or not isinstance(values, list):
            continue
        try:
            if values and not isinstance(values[0], list):  # flat, as tritonclient sends it
                array = np.empty(len(values), dtype)
                for i in range(0, len(values), ARRAY_CHUNK):
                    array[i : i + ARRAY_CHUNK] = np.array(values[i : i + ARRAY_CHUNK], dtype=dtype)
            else:
                array = np.asarray(values, dtype=dtype).reshape(-1)
        except (ValueError, TypeError, OverflowError):
            continue
        tensor.values = array


def _json_bytes(name: str, data: Any) -> list[bytes]:
    """JSON BYTES elements: base64 strings (OpenVINO Model Server's convention for files in JSON)."""
    flat = np.asarray(data, dtype=object).reshape(-1)
    try:
        return [base64.b64decode(item, validate=True) for item in flat]
    except (ValueError, TypeError):
        raise InvalidInput(
            f"input '{name}': BYTES data in JSON must be base64 strings (or send it with the binary extension)"
        ) from None


def encoded_image_inputs(config: ModelConfigFile) -> list[str]:
    """Inputs that also take encoded image files (BYTES, shape [N], one file per image), as
    OpenVINO Model Server's binary inputs do: the 4-D image inputs of a model whose preprocessing
    resizes every image to one size (so any images batch); native-size models take tensors only."""
    if config.preprocessing.resize is None:
        return []
    return [t.name for t in config.inputs if len(t.shape) == 4]


def _check_shape(inp: InputTensor, spec: TensorSpec, config: ModelConfigFile) -> None:
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


def _encoded_images(inp: InputTensor) -> list[bytes]:
    if len(inp.shape) != 1 or inp.shape[0] < 1:
        raise InvalidInput(
            f"input '{inp.name}': encoded images are sent as BYTES of shape [N], one image file per element; "
            f"got shape {inp.shape}"
        )
    count = inp.shape[0]
    if inp.elements is not None:
        if len(inp.elements) != count:
            raise InvalidInput(f"input '{inp.name}': {len(inp.elements)} BYTES elements for shape {inp.shape}")
        return inp.elements
    if inp.raw is not None:
        return bytes_elements(inp.name, inp.raw, count)
    elements = _json_bytes(inp.name, inp.values)
    if len(elements) != count:
        raise InvalidInput(f"input '{inp.name}': {len(elements)} BYTES elements for shape {inp.shape}")
    return elements


def decode_inputs(tensors: list[InputTensor], config: ModelConfigFile) -> DecodedInputs:
    """Validate every input against the model metadata and turn it into an array (or, for an
    encoded-image input, its files)."""
    declared = {t.name: t for t in config.inputs}
    sent = [i.name for i in tensors]
    if len(set(sent)) != len(sent):
        raise InvalidInput(f"duplicate input names in {sent}")
    unknown = sorted(set(sent) - declared.keys())
    missing = sorted(declared.keys() - set(sent))
    if unknown or missing:
        raise InvalidInput(
            f"model {config.name} takes inputs {sorted(declared)}; unknown: {unknown}, missing: {missing}"
        )
    decoded = DecodedInputs()
    for inp in tensors:
        spec = declared[inp.name]
        if inp.datatype == "BYTES" and spec.datatype != "BYTES" and inp.name in encoded_image_inputs(config):
            decoded.images[inp.name] = _encoded_images(inp)
            continue
        if inp.datatype != spec.datatype:
            also = " (or BYTES: encoded image files)" if inp.name in encoded_image_inputs(config) else ""
            raise InvalidInput(
                f"input '{inp.name}': datatype {inp.datatype} does not match the model's {spec.datatype}{also}"
            )
        _check_shape(inp, spec, config)
        shape = inp.shape
        dtype = DTYPES[spec.datatype]
        count = math.prod(shape)
        if inp.raw is not None:
            if len(inp.raw) != count * dtype.itemsize:
                raise InvalidInput(
                    f"input '{inp.name}': {len(inp.raw)} bytes of raw data (binary_data_size; raw_input_contents over "
                    f"gRPC) do not match shape {shape} of {inp.datatype} "
                    f"({count * dtype.itemsize} bytes)"
                )
            array = np.frombuffer(inp.raw, dtype=dtype, count=count)
        else:
            try:
                array = np.asarray(inp.values, dtype=dtype).reshape(-1)
            except (ValueError, TypeError) as exc:
                raise InvalidInput(
                    f"input '{inp.name}': data is not a (nested) list of {inp.datatype} numbers: {exc}"
                ) from None
            if array.size != count:
                raise InvalidInput(f"input '{inp.name}': {array.size} values for shape {shape} ({count} expected)")
        if not np.isfinite(array).all():
            raise InvalidInput(f"input '{inp.name}' contains NaN or infinity")
        decoded.arrays[inp.name] = array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    return decoded


def requested_outputs(requested: list[RequestOutput] | None, config: ModelConfigFile) -> list[RequestOutput]:
    """The outputs to answer with (every one when none was asked for), checked against the model."""
    names = [o.name for o in config.outputs]
    if not requested:
        return [RequestOutput(name=n) for n in names]
    unknown = sorted({o.name for o in requested} - set(names))
    if unknown:
        raise InvalidInput(f"model {config.name} has no outputs {unknown}; it has {names}")
    for o in requested:
        k = o.parameters.get("classification")
        if k is not None:
            if not config.labels or o.name != LOGITS_OUTPUT:
                raise InvalidInput(
                    f"classification is only available on the '{LOGITS_OUTPUT}' output of a classifier, not {o.name!r}"
                )
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise InvalidInput(f"output '{o.name}': classification must be a positive integer, got {k!r}")
    return requested


def classify_strings(scores: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Top-k `"score:index:label"` strings per batch row (Triton's classification extension)."""
    rows = scores.reshape(scores.shape[0], -1)
    top = top_k(rows, k)
    out = [[f"{rows[r, i]:f}:{i}:{labels[i] if i < len(labels) else ''}" for i in top[r]] for r in range(rows.shape[0])]
    return np.array(out, dtype=object)


def serialize_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor's raw form: each element as a 4-byte little-endian length, then its bytes."""
    parts = []
    for item in array.reshape(-1):
        b = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


@dataclass
class OutputTensor:
    """One output to answer with: its name, V2 datatype, and value (FP32, or strings for BYTES)."""

    request: RequestOutput
    datatype: str
    value: np.ndarray

    @property
    def name(self) -> str:
        return self.request.name

    def wire(self) -> bytes | np.ndarray:
        """Its raw bytes on the wire (binary data extension, gRPC's raw_output_contents): BYTES
        serialised; FP32 as a contiguous little-endian array, left to the transport to copy (HTTP a
        chunk at a time, gRPC with the GIL released)."""
        if self.datatype == "BYTES":
            return serialize_bytes(self.value)
        return np.ascontiguousarray(self.value, dtype=DTYPES["FP32"])


def output_tensors(
    outputs: list[RequestOutput], results: dict[str, np.ndarray], labels: list[str] | None
) -> list[OutputTensor]:
    """The model's results as the outputs asked for; the classification extension turns an
    output into its top-k `score:index:label` strings."""
    tensors = []
    for o in outputs:
        k = o.parameters.get("classification")
        if k is not None:
            tensors.append(OutputTensor(o, "BYTES", classify_strings(results[o.name], int(k), labels or [])))
        else:
            tensors.append(OutputTensor(o, "FP32", results[o.name]))
    return tensors


def encode_response(
    model_name: str, model_version: str, request: InferRequest, outputs: list[OutputTensor]
) -> tuple[list[bytes], dict[str, str]]:
    """The response body, as parts (service/large_bodies.py: numbers printed and bytes copied a
    chunk at a time, never joined), and its headers; binary outputs follow the JSON when any was
    asked for."""
    binary_default = bool(request.parameters.get("binary_data_output", False))
    entries: list[dict[str, Any]] = []
    values: list[list[bytes]] = []  # the JSON `data` of each output sent as JSON, as parts
    raw: list[bytes] = []
    for out in outputs:
        value = out.value
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(value.shape)}
        if out.request.parameters.get("binary_data", binary_default):
            wire = out.wire()
            parts = [wire] if isinstance(wire, bytes) else raw_parts(wire)
            entry["parameters"] = {"binary_data_size": sum(len(p) for p in parts)}
            raw += parts
        else:
            entry["data"] = ""  # filled in by json_parts
            values.append(
                [orjson.dumps(value.reshape(-1).tolist())] if out.datatype == "BYTES" else numbers_value(value)
            )
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request.id is not None:
        body["id"] = request.id
    header = json_parts(body, "data", values)
    if not raw:
        return header, {"content-type": "application/json"}
    return header + raw, {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(sum(len(p) for p in header)),
    }


LARGE_ANSWER_VALUES = 1 << 16  # outputs with more values than this are encoded in a thread


def large_answer(outputs: list[OutputTensor]) -> bool:
    """Encoding these outputs takes long enough (~1 ms per 15,000 numbers printed) to run in a thread."""
    return sum(out.value.size for out in outputs) > LARGE_ANSWER_VALUES
