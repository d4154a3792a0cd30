"""Reading what clients send: one image per request, as multipart field `file` or a raw
`image/*` body, and choosing the response type from `Accept`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from python_multipart.exceptions import MultipartParseError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from service.errors import InvalidInput, NotAcceptable, UnsupportedMediaType

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
        return await _read_multipart(request)
    if media.startswith(_RAW_TYPES):
        return await request.body()
    got = f"Content-Type {media!r}" if media else "no Content-Type"
    raise UnsupportedMediaType(
        f"{got}: send the image as multipart/form-data field '{FILE_FIELD}' or as a raw image/* body"
    )


async def _read_multipart(request: Request) -> bytes:
    try:
        form = await request.form(max_files=16, max_fields=64)
    except (MultiPartException, MultipartParseError, ValueError) as exc:
        raise InvalidInput(f"malformed multipart body: {exc}") from None
    try:
        items = form.multi_items()
        files = [v for k, v in items if k == FILE_FIELD]
        other_files = sorted({k for k, v in items if k != FILE_FIELD and isinstance(v, UploadFile)})
        if not files:
            fields = sorted({k for k, _ in items})
            raise InvalidInput(
                f"multipart body has no '{FILE_FIELD}' field (fields sent: {fields}); "
                f"send the image as field '{FILE_FIELD}'"
            )
        if len(files) > 1 or other_files:
            raise InvalidInput(
                f"send exactly one image per request: got {len(files)} '{FILE_FIELD}' field(s)"
                + (f" and other files {other_files}" if other_files else "")
            )
        upload = files[0]
        if not isinstance(upload, UploadFile):
            raise InvalidInput(f"field '{FILE_FIELD}' must be a file upload, not a text value")
        return await upload.read()
    finally:
        await form.close()


ImageBytes = Annotated[bytes, Depends(read_image_bytes)]


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
