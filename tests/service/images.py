"""Fixture images for the service tests, made in memory with Pillow.

Every generator is deterministic (fixed seeds, fixed colours), so a failing test reproduces
exactly. Byte-level helpers craft the files that a normal encoder would never write: headers that
declare a decompression bomb, truncated files, multi-frame files, multipart bodies by hand.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

# Formats decode_image accepts, with the MIME type a client would send for each.
ACCEPTED_FORMATS: dict[str, str] = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
}

# Formats Pillow opens but the service refuses (415).
UNSUPPORTED_FORMATS: dict[str, str] = {
    "ICO": "image/x-icon",
    "PPM": "image/x-portable-pixmap",
    "TGA": "image/x-tga",
    "PCX": "image/x-pcx",
}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXIF_ORIENTATION = 0x0112


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    """`img` saved as `fmt` into bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def gradient(width: int, height: int) -> np.ndarray:
    """A smooth RGB uint8 (H, W, 3) image: every channel varies, so channel or axis mix-ups show,
    and smooth, so lossy formats stay close to it."""
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // max(width - 1, 1)).astype(np.uint8)
    g = (y * 255 // max(height - 1, 1)).astype(np.uint8)
    b = ((x + y) * 255 // max(width + height - 2, 1)).astype(np.uint8)
    return np.stack([r, g, b], axis=-1)


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Random RGB uint8 (H, W, 3) pixels: incompressible, so files are long and truncation lands in pixel data."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_bytes(width: int, height: int, fmt: str = "PNG", **params: Any) -> bytes:
    """A gradient image of the given size in the given format."""
    return encode(Image.fromarray(gradient(width, height)), fmt, **params)


def png(width: int = 32, height: int = 32) -> bytes:
    return image_bytes(width, height, "PNG")


def solid(mode: str, size: tuple[int, int], color: Any) -> Image.Image:
    """A one-colour image in any Pillow mode; `size` is (width, height)."""
    return Image.new(mode, size, color)


def gray16(values: list[int], rows: int = 1) -> Image.Image:
    """A 16-bit grayscale image (mode I;16): `rows` identical rows holding `values`."""
    img = Image.fromarray(np.array([values] * rows, dtype=np.uint16))
    assert img.mode == "I;16", img.mode  # the fixture is only useful if Pillow keeps 16 bits
    return img


def palette_with_transparency(width: int = 4, height: int = 4) -> tuple[Image.Image, tuple[int, int, int]]:
    """A P image whose index 0 is transparent and whose pixel (1, 1) is index 1 (an opaque colour).

    Returns the image and the opaque colour."""
    opaque = (10, 200, 30)
    img = Image.new("P", (width, height), 0)
    img.putpalette([0, 0, 0, *opaque] + [0] * (256 * 3 - 6))
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    return img, opaque


def exif_jpeg(orientation: int, width: int = 40, height: int = 20) -> bytes:
    """A JPEG whose left half is red and right half blue, tagged with an EXIF orientation."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)


def multi_frame(fmt: str, frames: int = 2, size: tuple[int, int] = (8, 8)) -> bytes:
    """An animated / multi-page file with frames of different colours (identical frames get merged
    by some encoders, which would make a one-frame file)."""
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)]
    imgs = [Image.new("RGB", size, colours[i % len(colours)]) for i in range(frames)]
    return encode(imgs[0], fmt, save_all=True, append_images=imgs[1:], duration=100, loop=0)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height RGB pixels but whose data is a few bytes.

    Decoding it would fail (or allocate width*height*3 bytes first), so only a header check can
    answer PayloadTooLarge for it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def bmp_declaring(width: int, height: int) -> bytes:
    """A small BMP with its info header patched to declare width x height."""
    data = bytearray(encode(Image.new("RGB", (4, 4)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    """A small GIF with its logical screen patched to declare width x height (16-bit fields)."""
    data = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small baseline JPEG with its SOF0 frame header patched to declare width x height."""
    data = bytearray(encode(Image.new("RGB", (4, 4)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "normserve-test") -> tuple[bytes, str]:
    """A multipart/form-data body built by hand: (field name, filename or None for a text field, data).

    Returns the body and its Content-Type. httpx cannot send a file field without a filename or
    a multipart body holding text fields only, so the odd cases are built here."""
    out = bytearray()
    for name, filename, data in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if filename:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"
