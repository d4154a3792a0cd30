"""The corpus of bad image requests every image route must refuse with a clear 4xx: shared by the
in-process route tests and the test that sends it to a real server over a socket."""

from __future__ import annotations

from typing import Any

from images import encode, multi_frame, multipart, noise, png, png_declaring, solid
from PIL import Image

# (case id, keyword arguments for client.post, expected status, fragments the message must name)
BadRequest = tuple[str, dict[str, Any], int, tuple[str, ...]]


def _bad_requests() -> list[BadRequest]:
    """Requests the service must refuse with a 4xx, as (id, request kwargs, status, message fragments)."""
    text_field, text_field_type = multipart([("file", None, b"hello")])
    bad_png = encode(Image.fromarray(noise(64, 64)), "PNG")
    return [
        ("wrong-field-name", {"files": {"image": ("a.png", png(), "image/png")}}, 400, ("no 'file' field", "image")),
        (
            "two-files",
            {"files": [("file", ("a.png", png(), "image/png")), ("file", ("b.png", png(), "image/png"))]},
            400,
            ("exactly one image", "2"),
        ),
        (
            "file-and-another-file",
            {"files": {"file": ("a.png", png(), "image/png"), "mask": ("m.png", png(), "image/png")}},
            400,
            ("exactly one image", "mask"),
        ),
        (
            "file-as-text-field",
            {"content": text_field, "headers": {"content-type": text_field_type}},
            400,
            ("must be a file upload",),
        ),
        (
            "multipart-without-boundary",
            {"content": b"junk", "headers": {"content-type": "multipart/form-data"}},
            400,
            ("boundary",),
        ),
        ("text-plain", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, ("text/plain",)),
        ("no-content-type", {"content": png()}, 415, ("no Content-Type", "file")),
        ("json-body", {"json": {"image": "aGVsbG8="}}, 415, ("application/json",)),
        ("form-urlencoded", {"data": {"file": "x"}}, 415, ("application/x-www-form-urlencoded",)),
        ("zero-bytes-raw", {"content": b"", "headers": {"content-type": "image/png"}}, 400, ("empty",)),
        ("zero-bytes-multipart", {"files": {"file": ("a.png", b"", "image/png")}}, 400, ("empty",)),
        (
            "random-bytes",
            {"content": noise(50, 50).tobytes(), "headers": {"content-type": "image/png"}},
            400,
            ("not a decodable image",),
        ),
        (
            "text-bytes",
            {"content": b"definitely not a PNG\n" * 10, "headers": {"content-type": "image/png"}},
            400,
            ("not a decodable image",),
        ),
        (
            "truncated-png",
            {"content": bad_png[: len(bad_png) // 2], "headers": {"content-type": "image/png"}},
            400,
            ("truncated", "PNG"),
        ),
        (
            "ico",
            {"content": encode(solid("RGB", (16, 16), (1, 2, 3)), "ICO"), "headers": {"content-type": "image/x-icon"}},
            415,
            ("ICO",),
        ),
        (
            "animated-gif",
            {"files": {"file": ("a.gif", multi_frame("GIF"), "image/gif")}},
            400,
            ("multi-frame", "send one frame"),
        ),
        (
            "bomb",
            {"content": png_declaring(100_000, 100_000), "headers": {"content-type": "image/png"}},
            413,
            ("100000x100000",),
        ),
    ]


BAD_REQUESTS: list[BadRequest] = _bad_requests()
