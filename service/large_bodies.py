"""Large answers built without holding the GIL for long: a list of parts, sent one by one.

A thread that builds a body of tens of MB in one C call (`b"".join`, `bytes.decode`,
`orjson.dumps` of a string of that size) holds the GIL for the whole call, ~60 ms each for
88 MB on this machine, and the worker's event loop answers nobody meanwhile: running the step in
a thread does not help while the call itself is one. So the JSON answers that carry base64 of a
large buffer (/features, /reconstruct with Accept: application/json), and V2 answers with large
outputs (their numbers printed as JSON, or their raw bytes), are built as parts: the JSON around
the data, dumped with the data empty, and the data a chunk at a time (each call ~2 ms);
`PartsResponse` sends the parts as one body with its Content-Length, never joining them.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

# bytes base64-encoded per call (a multiple of 3, so the chunks' base64 joins into the whole's):
# ~2 ms holding the GIL per call, 1 MiB of base64 per part
B64_CHUNK = 3 << 18


def base64_parts(data: Any) -> list[bytes]:
    """base64 of a buffer (bytes, a contiguous array), as parts that join into it."""
    raw = memoryview(data).cast("B")
    return [binascii.b2a_base64(raw[i : i + B64_CHUNK], newline=False) for i in range(0, len(raw), B64_CHUNK)]


def base64_value(buffer: Any) -> list[bytes]:
    """A JSON string of the base64 of `buffer`, as parts."""
    return [b'"', *base64_parts(buffer), b'"']


# numbers printed per orjson call: ~2 ms holding the GIL
NUMBERS_CHUNK = 1 << 15


def numbers_value(array: np.ndarray) -> list[bytes]:
    """A JSON array of the values of `array` (flattened, in C order), as parts: what
    orjson.dumps(array, option=OPT_SERIALIZE_NUMPY) prints, `NUMBERS_CHUNK` values per call."""
    flat = np.ascontiguousarray(array).reshape(-1)
    parts = [b"["]
    for i in range(0, flat.size, NUMBERS_CHUNK):
        parts += [b","] if i else []
        parts.append(orjson.dumps(flat[i : i + NUMBERS_CHUNK], option=orjson.OPT_SERIALIZE_NUMPY)[1:-1])
    return [*parts, b"]"]


def raw_parts(array: np.ndarray) -> list[bytes]:
    """The bytes of `array` in C order, as parts of at most `RAW_CHUNK` bytes."""
    flat = np.ascontiguousarray(array).reshape(-1)
    step = max(1, RAW_CHUNK // flat.itemsize)
    return [flat[i : i + step].tobytes() for i in range(0, flat.size, step)] or [b""]


RAW_CHUNK = 4 << 20  # bytes copied per call: ~1 ms


def json_parts(obj: Any, key: str, values: Sequence[list[bytes]]) -> list[bytes]:
    """`obj` as JSON, with the i-th `"<key>": ""` of it (in document order) holding the JSON value
    whose parts are `values[i]` (`base64_value`, `numbers_value`): the parts of the body, which
    join into that JSON."""
    marker = b'"%s":""' % key.encode()
    # A string value cannot contain the marker: orjson escapes its quotes (\").
    pieces = orjson.dumps(obj).split(marker)
    if len(pieces) != len(values) + 1:
        raise ValueError(f"{len(pieces) - 1} empty {key!r} fields for {len(values)} values")
    parts = [pieces[0]]
    for value, after in zip(values, pieces[1:], strict=True):
        parts += [b'"%s":' % key.encode(), *value, after]
    return parts


SMALL_BODY = 64 * 1024


class PartsResponse(Response):
    """A body sent as its parts, in order, with the Content-Length of their sum."""

    def __init__(
        self, parts: list[bytes], media_type: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        size = sum(len(p) for p in parts)
        # a small body (most answers) is one message: each message costs a pass through every
        # middleware's send, and joining a few KiB costs nothing
        self.parts = [b"".join(parts)] if len(parts) > 1 and size <= SMALL_BODY else parts
        super().__init__(b"", media_type=media_type, headers=headers)
        self.headers["content-length"] = str(size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.parts) - 1
        for i in range(len(self.parts)):
            part, self.parts[i] = self.parts[i], b""  # what was sent is not held here any more
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
            del part
        if self.background is not None:
            await self.background()
