"""Pre- and post-processing shared by every image route: decode, normalise mode, resize,
to-tensor, and back to PNG. Routes call these; none repeats them.

Decoding is defensive: the pixel count is checked from the header before any pixel is
decoded (a decompression bomb is refused without the memory spike), unknown formats are 415,
truncated or corrupt data is 400, and every message says what to do about it.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from normserve.service.errors import InvalidInput, NotAcceptable, PayloadTooLarge, UnsupportedMediaType

# MPO is the JPEG phone cameras write (a JPEG primary image followed by previews or depth maps):
# its first frame is the photo, the rest is not looked at.
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF"})
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

# Our own header check runs first; keep Pillow's bomb guard as a backstop, never the decider.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodedImage:
    """An RGB uint8 image (H, W, 3) and where it came from."""

    pixels: np.ndarray
    format: str

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB. Alpha is composited on white (as a page would show it); 16-bit
    channels are scaled, not clipped."""
    if img.mode in _HIGH_BIT_MODES:
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), mode="L")
    if "transparency" in img.info:  # palette index or colour key (tRNS on L/RGB)
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _sniff_format(data: bytes) -> str:
    """The format a file's magic bytes claim, for messages about files Pillow could not open."""
    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(data[:32]):
                return fmt
        except Exception:  # an accept() that trips on a short prefix says nothing
            continue
    return "image"


def open_image(data: bytes, max_pixels: int, limit_name: str = "") -> Image.Image:
    """Read and check an image file's header, decoding no pixels: the format is allowed, it has
    pixels, at most `max_pixels` of them (413, naming `limit_name`, the setting, if given) and one
    frame. Cheap: the cost of a header, whatever the image's size."""
    if not data:
        raise InvalidInput("empty image: the request carried no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidInput(
            f"not a decodable image ({len(data)} bytes); send a PNG, JPEG, WebP, BMP, GIF or TIFF file"
        ) from None
    except (OSError, ValueError, TypeError, SyntaxError, struct.error) as exc:  # cut or corrupt header
        raise InvalidInput(f"corrupt or truncated {_sniff_format(data)} header: {exc}") from None
    fmt = img.format or "unknown"
    if fmt not in ALLOWED_FORMATS:
        raise UnsupportedMediaType(f"image format {fmt} is not accepted; use one of {sorted(ALLOWED_FORMATS)}")
    w, h = img.size
    if w < 1 or h < 1:
        raise InvalidInput(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        setting = f" ({limit_name})" if limit_name else ""
        raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels{setting}")
    n_frames = int(getattr(img, "n_frames", 1))
    if n_frames > 1 and fmt != "MPO":
        raise InvalidInput(f"animated or multi-frame {fmt} ({n_frames} frames) is not accepted; send one frame")
    return img


def decode_opened(img: Image.Image) -> DecodedImage:
    """The pixels of an image `open_image` checked: RGB uint8, EXIF orientation applied."""
    fmt = img.format or "unknown"
    try:
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img) or img)
    except (OSError, ValueError, TypeError, SyntaxError, struct.error) as exc:  # truncated/corrupt data
        raise InvalidInput(f"corrupt or truncated {fmt} image: {exc}") from None
    return DecodedImage(np.asarray(rgb, dtype=np.uint8), fmt)


def decode_image(data: bytes, max_pixels: int, limit_name: str = "") -> DecodedImage:
    """Bytes of an image file → RGB uint8 pixels, EXIF orientation applied. More than
    `max_pixels` is refused from the header (413), naming `limit_name` (the setting) if given."""
    return decode_opened(open_image(data, max_pixels, limit_name))


def pad_to_min_side(image: DecodedImage, min_side: int) -> DecodedImage:
    """An image with a side under `min_side` (what the graph accepts), mirrored out to it at the
    bottom and right (numpy's symmetric padding: a 1-pixel image repeats itself); the caller crops
    the answer back to the original size. Any other image is returned as it is."""
    h, w = image.pixels.shape[:2]
    if h >= min_side and w >= min_side:
        return image
    padded = np.pad(image.pixels, ((0, max(0, min_side - h)), (0, max(0, min_side - w)), (0, 0)), mode="symmetric")
    return DecodedImage(padded, image.format)


def to_tensor(image: DecodedImage, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) → float32 (1, 3, H', W') in [0, 1]; `size` = (H', W') resizes bilinearly
    (Pillow antialiases when shrinking)."""
    pixels = image.pixels
    if size is not None and (image.height, image.width) != tuple(size):
        resized = Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized)
    x = pixels.astype(np.float32) * (1.0 / 255.0)  # (H, W, 3)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # (1, 3, H, W)


def to_uint8_image(chw: np.ndarray) -> np.ndarray:
    """float (3, H, W) in [0, 1] → uint8 (H, W, 3), rounded."""
    return np.clip(np.rint(chw.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 (H, W, 3) → PNG bytes; a low compression level keeps encoding off the critical path."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


# What /reconstruct can answer, by media type: Pillow format and the most pixels a side it holds.
OUTPUT_FORMATS: dict[str, tuple[str, int]] = {
    "image/png": ("PNG", 2**31 - 1),
    "image/webp": ("WEBP", 16383),
    "image/jpeg": ("JPEG", 65535),
}


def check_encodable(media_type: str, width: int, height: int) -> None:
    """Refuse (406) before any work a size the asked-for format cannot hold (WebP: 16383 a side)."""
    fmt, max_side = OUTPUT_FORMATS[media_type]
    if max(width, height) > max_side:
        raise NotAcceptable(
            f"{fmt} holds at most {max_side} pixels a side and the image is {width}x{height}; "
            f"ask for another type (Accept: image/png)"
        )


def encode_image(pixels: np.ndarray, media_type: str, *, png_level: int, jpeg_quality: int, webp_quality: int) -> bytes:
    """uint8 (H, W, 3) → bytes of `media_type` (a key of OUTPUT_FORMATS). PNG is lossless; JPEG
    (4:2:0) and WebP are lossy at the given quality."""
    fmt, _ = OUTPUT_FORMATS[media_type]
    if fmt == "PNG":
        return encode_png(pixels, png_level)
    buf = io.BytesIO()
    img = Image.fromarray(pixels)
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        img.save(buf, format="WEBP", quality=webp_quality, method=0)  # method 0: the fastest encoder
    return buf.getvalue()


def float_to_uint8(hwc: np.ndarray) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1] → uint8, rounded; works in place on `hwc` (no image-sized
    temporaries: for the large images tiling serves)."""
    np.multiply(hwc, 255.0, out=hwc)
    np.rint(hwc, out=hwc)
    np.clip(hwc, 0, 255, out=hwc)
    return hwc.astype(np.uint8)
