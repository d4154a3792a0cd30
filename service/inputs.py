"""Reading what clients send: one image per request, as multipart field `file` or a raw
`image/*` body, and choosing the response type from `Accept`."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar, cast

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from normserve.service.errors import InvalidInput, NotAcceptable, UnsupportedMediaType
from normserve.service.tracing import stage

FILE_FIELD = "file"
_RAW_TYPES = ("image/", "application/octet-stream")

# OpenAPI description of the body, since it is read by hand (two encodings on one route).
IMAGE_BODY_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def read_image_bytes(request: Request) -> bytes:
    """The uploaded image's bytes, or a 4xx naming what is wrong with the request."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        with stage(request, "read"):
            return await _read_multipart(request)
    if media.startswith(_RAW_TYPES):
        with stage(request, "read"):
            return await request.body()
    got = f"Content-Type {media!r}" if media else "no Content-Type"
    raise UnsupportedMediaType(
        f"{got}: send the image as multipart/form-data field '{FILE_FIELD}' or as a raw image/* body"
    )


MAX_PARTS = 64  # parts in one multipart body: one image is expected, a few text fields are tolerated


class _Parts:
    """python-multipart callbacks that keep every part of a body in memory: (name, is a file,
    bytes). The body is already bounded by the body-size limit, so nothing is spooled to disk."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, bool, bytearray]] = []
        self._header = b""
        self._value = b""
        self._disposition = b""
        self._data = bytearray()

    def on_part_begin(self) -> None:
        self._disposition, self._data = b"", bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidInput('malformed multipart body: a part has no Content-Disposition "name"')
        if len(self.parts) >= MAX_PARTS:
            raise InvalidInput(f"malformed multipart body: more than {MAX_PARTS} parts")
        name = options[b"name"].decode("utf-8", "replace")
        self.parts.append((name, b"filename" in options, self._data))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += memoryview(data)[start:end]  # appended without an intermediate slice copy


def _multipart_parts(body: bytes, content_type: str) -> list[tuple[str, bool, bytearray]]:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidInput("malformed multipart body: Missing boundary in multipart.")
    parts = _Parts()
    callbacks = {
        "on_part_begin": parts.on_part_begin,
        "on_header_field": parts.on_header_field,
        "on_header_value": parts.on_header_value,
        "on_header_end": parts.on_header_end,
        "on_headers_finished": parts.on_headers_finished,
        "on_part_data": parts.on_part_data,
    }
    try:
        parser = MultipartParser(boundary, cast(Any, callbacks))
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        raise InvalidInput(f"malformed multipart body: {exc}") from None
    return parts.parts


async def _read_multipart(request: Request) -> bytes:
    """The `file` part of a multipart body, parsed in memory (the body is bounded by the body-size
    limit); a 400 naming the problem when there is not exactly one image file in it."""
    parts = _multipart_parts(await request.body(), request.headers.get("content-type", ""))
    files = [(is_file, data) for name, is_file, data in parts if name == FILE_FIELD]
    other_files = sorted({name for name, is_file, _ in parts if name != FILE_FIELD and is_file})
    if not files:
        fields = sorted({name for name, _, _ in parts})
        raise InvalidInput(
            f"multipart body has no '{FILE_FIELD}' field (fields sent: {fields}); "
            f"send the image as field '{FILE_FIELD}'"
        )
    if len(files) > 1 or other_files:
        raise InvalidInput(
            f"send exactly one image per request: got {len(files)} '{FILE_FIELD}' field(s)"
            + (f" and other files {other_files}" if other_files else "")
        )
    is_file, data = files[0]
    if not is_file:
        raise InvalidInput(f"field '{FILE_FIELD}' must be a file upload, not a text value")
    return bytes(data)


ImageBytes = Annotated[bytes, Depends(read_image_bytes)]

Params = TypeVar("Params", bound=BaseModel)


def query_params(model: type[Params], request: Request) -> Params:
    """The query string validated by a pydantic model, failing as FastAPI's query models do (a 422
    naming `query.<field>`), for routes answered without FastAPI's dependency solving."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        errors = [{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def negotiate(accept: str | None, offers: list[str], *, fallback: bool = True) -> str:
    """The offer the client prefers by `Accept` (RFC 9110: q-values honoured, a type refused with
    q=0 is never chosen, the most specific matching range decides an offer's q; the first offer on
    a tie). When nothing is acceptable: the first offer if `fallback` (as most servers do), else
    `NotAcceptable` (406) naming what the route can answer."""
    if not accept or not accept.strip():
        return offers[0]
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        media, *params = (s.strip() for s in part.split(";"))
        if not media:
            continue
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        ranges.append((media.lower(), q))
    best, best_key = None, (0.0, -1)
    for offer in offers:
        # (specificity, q) of the most specific range matching this offer: exact > type/* > */*
        matches = [
            (2 if media == offer else 1 if media.endswith("/*") and offer.startswith(media[:-1]) else 0, q)
            for media, q in ranges
            if media in (offer, "*/*") or (media.endswith("/*") and offer.startswith(media[:-1]))
        ]
        if not matches:
            continue
        specificity, q = max(matches)
        if q > 0 and (q, specificity) > best_key:
            best, best_key = offer, (q, specificity)
    if best is not None:
        return best
    if fallback:
        return offers[0]
    raise NotAcceptable(f"nothing in Accept {accept!r} is available here; this route answers {', '.join(offers)}")
