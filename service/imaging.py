"""Pre- and post-processing shared by every image route: decode, normalise mode, resize,
to-tensor, and back to PNG. Routes call these; none repeats them.

Decoding is defensive: the pixel count is checked from the header before any pixel is
decoded (a decompression bomb is refused without the memory spike), unknown formats are 415,
truncated or corrupt data is 400, and every message says what to do about it.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from normserve.service.budget import CHUNK_PIXELS, TENSOR_PHASE_MARGIN, decode_bytes, tensor_bytes
from normserve.service.errors import InvalidInput, NotAcceptable, PayloadTooLarge, UnsupportedMediaType

# MPO is the JPEG phone cameras write (a JPEG primary image followed by previews or depth maps):
# its first frame is the photo, the rest is not looked at.
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF"})
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

# None turns Pillow's own decompression-bomb check (its warning and its error) off: the pixel
# limit is `open_image`'s check of the header's size against NORMSERVE_MAX_IMAGE_PIXELS (or the
# route's lower limit), which every decode in the service goes through first.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodedImage:
    """An RGB uint8 image (H, W, 3) and where it came from."""

    pixels: np.ndarray
    format: str
    size: tuple[int, int] | None = None  # (width, height) of the file when `pixels` were decoded reduced

    @property
    def height(self) -> int:
        return self.size[1] if self.size else int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return self.size[0] if self.size else int(self.pixels.shape[1])


def _high_bit_scale(img: Image.Image) -> float:
    """What a 16-bit/int ('I;16', 'I') or float ('F') image's values are multiplied by to reach
    0-255: 1/257 for integers (65535 -> 255, scaled, not clipped); 255 for a float image whose
    values are all at most 1.0 (read from Pillow's extrema: no copy of the image), else 1."""
    if img.mode in _HIGH_BIT_MODES:
        return 1.0 / 257.0
    if img.mode == "F":
        _, high = img.getextrema()
        return 255.0 if float(high) <= 1.0 else 1.0  # type: ignore[arg-type]
    return 1.0


def _to_rgb(img: Image.Image, scale: float = 1.0) -> Image.Image:
    """Any Pillow mode → RGB. Alpha is composited on white (as a page would show it); 16-bit and
    float values are multiplied by `scale` (`_high_bit_scale` of the whole image), rounded and
    clipped. Called on chunks of rows, so its temporaries are chunk-sized."""
    if img.mode in _HIGH_BIT_MODES or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode in _HIGH_BIT_MODES:
            a /= 257.0  # as before: a / 257, not a * (1 / 257), for the same rounding
        elif scale != 1.0:
            a *= scale
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if "transparency" in img.info:  # palette index or colour key (tRNS on L/RGB)
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _rgb_array(img: Image.Image, factor: int = 1) -> np.ndarray:
    """A loaded Pillow image of any mode → RGB uint8 (ceil(H/f), ceil(W/f), 3), converted in
    chunks of rows (about CHUNK_PIXELS each), each box-reduced by `factor` when > 1 (Pillow's
    `reduce`; chunks start at multiples of the factor, so the result is the whole image's
    reduce). No full-size intermediate: the output is the only image-sized allocation."""
    w, h = img.size
    scale = _high_bit_scale(img)
    if factor == 1 and w * h <= CHUNK_PIXELS:  # one chunk: convert the image itself, no crop
        return np.array(_to_rgb(img, scale))  # a writable copy (/reconstruct finishes tiles in place)
    rows = max(factor, (max(1, CHUNK_PIXELS // w) // factor) * factor)
    out = np.empty((-(-h // factor), -(-w // factor), 3), np.uint8)
    for y0 in range(0, h, rows):
        chunk = _to_rgb(img.crop((0, y0, w, min(h, y0 + rows))), scale)
        if factor > 1:
            chunk = chunk.reduce(factor)
        out[y0 // factor : y0 // factor + chunk.height] = np.asarray(chunk)
    return out


# EXIF orientation (2-8) → the numpy view that shows the image upright (ImageOps.exif_transpose's
# transposes, on the RGB array: one copy of the output instead of one of the decoded image).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


# What Pillow's getexif reads an orientation from, beside a TIFF's own tags (Image.getexif).
_EXIF_SOURCES = frozenset(("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"))


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 = upright) of an image. Before `load()` a PNG's is read from
    the eXIf chunk before its pixels only (Pillow's getexif would decode the whole image to look
    after them); once loaded, from wherever the file has it."""
    if img.format != "TIFF" and _EXIF_SOURCES.isdisjoint(img.info):
        return 1  # nothing that getexif would read: upright, without building an Exif
    try:
        if img.format == "PNG" and getattr(img, "im", None) is None:
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = exif.get(ExifTags.Base.Orientation, 1)
    except Exception:  # a corrupt EXIF block: upright, as exif_transpose would leave it
        return 1
    return value if isinstance(value, int) and value in _ORIENT else 1


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


@dataclass(frozen=True)
class DecodeLimits:
    """What one decode may cost beyond its pixel count (NORMSERVE_MAX_JPEG_SCANS,
    NORMSERVE_MAX_PIXELS_PER_BYTE; 0 turns a check off)."""

    max_jpeg_scans: int = 0
    max_pixels_per_byte: int = 0
    ratio_floor_pixels: int = 4_000_000  # images up to this size decode cheaply whatever their file size


def jpeg_scans(data: bytes) -> int:
    """The number of scans (SOS markers) in a JPEG file, from its markers alone: the segments
    before the first scan are skipped by their lengths (an EXIF thumbnail's scans do not count),
    and after it every 0xFF 0xDA is a scan (entropy-coded data stuffs 0xFF as 0xFF 0x00)."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return 0  # not a marker where one must be: Pillow reports the corruption
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return data.count(b"\xff\xda", pos)
        if marker in (0x01, *range(0xD0, 0xD9)):  # markers without a length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return 0


def open_image(data: bytes, max_pixels: int, limit_name: str = "", limits: DecodeLimits | None = None) -> Image.Image:
    """Read and check an image file's header, decoding no pixels: the format is allowed, it has
    pixels, at most `max_pixels` of them (413, naming `limit_name`, the setting, if given), one
    frame, and (with `limits`) no more JPEG scans or pixels per byte of file than allowed. Cheap:
    the cost of a header and one pass over the bytes, whatever the image's size."""
    if not data:
        raise InvalidInput("empty image: the request carried no image bytes")
    try:
        img = Image.open(io.BytesIO(data))  # Pillow's own bomb check is off (MAX_IMAGE_PIXELS above)
    except UnidentifiedImageError:
        raise InvalidInput(
            f"not a decodable image ({len(data)} bytes); send a PNG, JPEG, WebP, BMP, GIF or TIFF file"
        ) from None
    except (OSError, ValueError, TypeError, SyntaxError, struct.error) as exc:  # cut or corrupt header
        raise InvalidInput(f"corrupt or truncated {_sniff_format(data)} header: {exc}") from None
    except Image.DecompressionBombError as exc:  # only if something in the process set MAX_IMAGE_PIXELS again
        raise PayloadTooLarge(str(exc)) from None
    fmt = img.format or "unknown"
    if fmt not in ALLOWED_FORMATS:
        raise UnsupportedMediaType(f"image format {fmt} is not accepted; use one of {sorted(ALLOWED_FORMATS)}")
    w, h = img.size
    if w < 1 or h < 1:
        raise InvalidInput(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        setting = f" ({limit_name})" if limit_name else ""
        raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels{setting}")
    # is_animated reads one frame header past the first; n_frames would walk every frame (a
    # file of a million tiny frames makes that the expensive step). MPO: its first frame is the photo.
    if fmt != "MPO" and getattr(img, "is_animated", False):
        raise InvalidInput(f"animated or multi-frame {fmt} is not accepted; send one frame")
    if limits is not None:
        _check_decode_cost(data, img, limits)
    return img


def _check_decode_cost(data: bytes, img: Image.Image, limits: DecodeLimits) -> None:
    """413 for a file whose decode would cost far more CPU than its size suggests: a JPEG with
    more scans than `max_jpeg_scans` (each scan is a pass over the whole image), or more declared
    pixels per byte of file than `max_pixels_per_byte` (a 35-byte GIF that decodes to 38 MP)."""
    w, h = img.size
    fmt = img.format or "unknown"
    if limits.max_pixels_per_byte and w * h > limits.ratio_floor_pixels:
        ratio = w * h / len(data)
        if ratio > limits.max_pixels_per_byte:
            raise PayloadTooLarge(
                f"{fmt} of {len(data)} bytes declares {w}x{h} = {w * h} pixels ({ratio:,.0f} pixels per byte); "
                f"above {limits.ratio_floor_pixels} pixels at most {limits.max_pixels_per_byte} pixels per byte "
                f"are decoded (NORMSERVE_MAX_PIXELS_PER_BYTE): a decompression bomb"
            )
    if limits.max_jpeg_scans and fmt in ("JPEG", "MPO"):
        scans = jpeg_scans(data)
        if scans > limits.max_jpeg_scans:
            raise PayloadTooLarge(
                f"JPEG has {scans} scans; at most {limits.max_jpeg_scans} are decoded (NORMSERVE_MAX_JPEG_SCANS): "
                f"each scan is another pass over the image; re-encode it (baseline or a standard progression)"
            )


SMALL_TENSOR_PIXELS = 128 * 128  # to_tensor makes temporaries up to this size (same values either way)
# A decoded image larger than this is closed as soon as its pixels are copied out; a smaller one
# (a few KB) goes with its last reference, sparing the close's calls on the per-request path.
CLOSE_AFTER_PIXELS = 128 * 128
REDUCING_GAP = 3.0  # decode/reduce to at least this many times the target size (Pillow's reducing_gap)


@dataclass(slots=True)
class DecodePlan:
    """How an opened image will be decoded, and what that costs: the JPEG draft already applied
    to `img`, the box-reduce factor, the EXIF orientation and the estimated peak bytes."""

    img: Image.Image
    size: tuple[int, int]  # (width, height) of the file, before any draft or reduce
    factor: int
    orientation: int
    out_pixels: int  # pixels of the decoded RGB array
    peak_bytes: int

    @property
    def decoded_pixels(self) -> int:
        """Pixels of the image Pillow allocates when it decodes (after a JPEG draft)."""
        w, h = self.img.size
        return w * h

    def tensor_phase_bytes(self, size: tuple[int, int] | None) -> int:
        """What is alive once `to_tensor` has made the model input (resized to `size`, if
        given): the RGB array, the resize's Pillow copy and its result, and the float32 tensor."""
        run_px = size[0] * size[1] if size else self.out_pixels
        resize = 4 * self.out_pixels + 3 * run_px if size else 0
        return int(TENSOR_PHASE_MARGIN * (3 * self.out_pixels + resize + tensor_bytes(run_px)))


def plan_decode(img: Image.Image, target: tuple[int, int] | None = None) -> DecodePlan:
    """Plan the decode of an image `open_image` checked. With `target` (H, W: the route resizes
    to it anyway) a large image is decoded reduced, to at least REDUCING_GAP x the target: a JPEG
    by its DCT scaling (`Image.draft`, less decoding work and memory), any format by a box
    `reduce` of each chunk as it is converted. The resize to `target` then starts from that."""
    size = img.size
    fmt = img.format or "unknown"
    progressive = bool(img.info.get("progressive") or img.info.get("progression")) and fmt in ("JPEG", "MPO")
    components = len(img.getbands()) if progressive else 0
    factor = 1
    if target is not None:
        side = REDUCING_GAP * max(target)
        if fmt in ("JPEG", "MPO") and min(size) >= 2 * side:
            img.draft(img.mode, (int(side), int(side)))  # scale 1/2, 1/4 or 1/8, no smaller than side
        factor = max(1, int(min(img.size) // side))
    w, h = img.size
    out_pixels = -(-w // factor) * -(-h // factor)
    turn = orientation(img)
    peak = decode_bytes(
        img.mode,
        fmt,
        w,
        h,
        out_pixels,
        progressive_components=components,
        full_pixels=size[0] * size[1],
        full_width=size[0],
        oriented=turn != 1,
    )
    return DecodePlan(img, size, factor, turn, out_pixels, peak)


def decode_planned(plan: DecodePlan) -> DecodedImage:
    """The pixels of a planned decode: RGB uint8, EXIF orientation applied."""
    img = plan.img
    fmt = img.format or "unknown"
    try:
        img.load()
        turn = orientation(img)  # loaded: an eXIf chunk after a PNG's pixels counts too
        pixels = _rgb_array(img, plan.factor)
    except (OSError, ValueError, TypeError, SyntaxError, struct.error) as exc:  # truncated/corrupt data
        raise InvalidInput(f"corrupt or truncated {fmt} image: {exc}") from None
    finally:
        if plan.out_pixels * plan.factor**2 > CLOSE_AFTER_PIXELS:
            img.close()  # the decoded image is freed here, not when the last reference goes
    w, h = plan.size
    if turn != 1:
        pixels = np.ascontiguousarray(_ORIENT[turn](pixels))
        if turn >= 5:
            w, h = h, w
    reduced = pixels.shape[:2] != (h, w)
    return DecodedImage(pixels, fmt, (w, h) if reduced else None)


def decode_opened(img: Image.Image) -> DecodedImage:
    """The pixels of an image `open_image` checked, at full size: RGB uint8, EXIF orientation applied."""
    return decode_planned(plan_decode(img))


def decode_image(
    data: bytes, max_pixels: int, limit_name: str = "", limits: DecodeLimits | None = None
) -> DecodedImage:
    """Bytes of an image file → RGB uint8 pixels, EXIF orientation applied. More than
    `max_pixels` is refused from the header (413), naming `limit_name` (the setting) if given."""
    return decode_opened(open_image(data, max_pixels, limit_name, limits))


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
    if size is not None and pixels.shape[:2] != tuple(size):
        resized = Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized)
    h, w = pixels.shape[:2]
    if h * w <= SMALL_TENSOR_PIXELS:  # fewer numpy calls; the temporaries are a few KB
        return np.ascontiguousarray((pixels.astype(np.float32) * (1.0 / 255.0)).transpose(2, 0, 1)[None])
    x = np.empty((1, 3, h, w), np.float32)  # the only image-sized float buffer
    for c in range(3):
        np.multiply(pixels[:, :, c], np.float32(1.0 / 255.0), out=x[0, c], dtype=np.float32)
    return x


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
