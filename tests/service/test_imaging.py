"""normserve.service.imaging: decoding every accepted format and mode to RGB, refusing bad input with the
right domain error, and the tensor / PNG conversions the routes rely on."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from images import (
    ACCEPTED_FORMATS,
    UNSUPPORTED_FORMATS,
    bmp_declaring,
    encode,
    exif_jpeg,
    gif_declaring,
    gradient,
    gray16,
    image_bytes,
    jpeg_declaring,
    multi_frame,
    noise,
    palette_with_transparency,
    png,
    png_declaring,
    solid,
)
from PIL import Image

from normserve.service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from normserve.service.imaging import DecodedImage, decode_image, encode_png, to_tensor, to_uint8_image

LIMIT = 40_000_000  # the default NORMSERVE_MAX_IMAGE_PIXELS
WHITE = (255, 255, 255)


def decode(data: bytes, max_pixels: int = LIMIT) -> DecodedImage:
    return decode_image(data, max_pixels)


def first_pixel(data: bytes) -> tuple[int, ...]:
    return tuple(int(v) for v in decode(data).pixels[0, 0])


# -- formats ---------------------------------------------------------------------------------

# Largest mean |error| per channel value each format may add to the gradient fixture:
# lossless formats none; JPEG and lossy WebP (chroma subsampling) and GIF (256 colours) a few levels.
# A channel or axis mix-up costs tens of levels, so these bounds still catch one.
FORMAT_TOLERANCE = {"PNG": 0.0, "BMP": 0.0, "TIFF": 0.0, "WEBP": 8.0, "JPEG": 8.0, "GIF": 8.0}


@pytest.mark.parametrize("fmt", sorted(ACCEPTED_FORMATS))
@pytest.mark.parametrize(("width", "height"), [(20, 12), (1, 1), (7, 33)])
def test_decodes_each_accepted_format(fmt: str, width: int, height: int) -> None:
    expected = gradient(width, height)
    image = decode(encode(Image.fromarray(expected), fmt))
    assert image.format == fmt
    assert image.pixels.shape == (height, width, 3)
    assert image.pixels.dtype == np.uint8
    assert (image.width, image.height) == (width, height)
    error = np.abs(image.pixels.astype(np.float64) - expected).mean()
    assert error <= FORMAT_TOLERANCE[fmt], f"{fmt}: mean error {error:.2f}"


def test_lossless_webp_is_exact() -> None:
    expected = noise(16, 9)
    image = decode(encode(Image.fromarray(expected), "WEBP", lossless=True))
    np.testing.assert_array_equal(image.pixels, expected)


# -- modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        pytest.param("RGBA", (0, 0, 0, 0), WHITE, id="RGBA-transparent-black-is-white"),
        pytest.param("RGBA", (200, 10, 20, 0), WHITE, id="RGBA-transparent-colour-is-white"),
        pytest.param("RGBA", (200, 10, 20, 255), (200, 10, 20), id="RGBA-opaque"),
        pytest.param("LA", (0, 0), WHITE, id="LA-transparent"),
        pytest.param("LA", (90, 255), (90, 90, 90), id="LA-opaque"),
        pytest.param("L", 77, (77, 77, 77), id="L"),
        pytest.param("1", 1, WHITE, id="1-white"),
        pytest.param("1", 0, (0, 0, 0), id="1-black"),
        pytest.param("RGB", (1, 2, 3), (1, 2, 3), id="RGB"),
    ],
)
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_modes_become_rgb(mode: str, color: object, expected: tuple[int, int, int], fmt: str) -> None:
    data = encode(solid(mode, (3, 2), color), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode  # the file really carries this mode
    image = decode(data)
    assert image.pixels.shape == (2, 3, 3)
    assert first_pixel(data) == expected


@pytest.mark.parametrize("alpha", [64, 128, 192])
def test_partial_alpha_is_composited_on_white(alpha: int) -> None:
    # Black at alpha a over white: 255 * (1 - a/255), within Pillow's rounding.
    value = first_pixel(encode(solid("RGBA", (2, 2), (0, 0, 0, alpha)), "PNG"))
    assert value[0] == value[1] == value[2]
    assert abs(value[0] - 255 * (1 - alpha / 255)) <= 1


def test_palette_image_uses_its_palette() -> None:
    img = Image.new("P", (2, 2), 3)
    img.putpalette([0, 0, 0] * 3 + [12, 34, 56] + [0] * (252 * 3))
    assert first_pixel(encode(img, "PNG")) == (12, 34, 56)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_white(fmt: str) -> None:
    img, opaque = palette_with_transparency()
    data = encode(img, fmt, transparency=0)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and "transparency" in opened.info
    pixels = decode(data).pixels
    assert tuple(pixels[0, 0]) == WHITE  # the transparent index
    assert tuple(pixels[1, 1]) == opaque  # an opaque index keeps its colour


@pytest.mark.parametrize(
    ("mode", "key", "other"),
    [("L", 0, 200), ("RGB", (0, 0, 0), (200, 100, 50))],
    ids=["L-tRNS", "RGB-tRNS"],
)
def test_colour_key_transparency_is_white(mode: str, key: object, other: object) -> None:
    img = solid(mode, (4, 4), key)
    img.putpixel((1, 1), other)  # type: ignore[arg-type]
    data = encode(img, "PNG", transparency=key)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == mode and opened.info.get("transparency") == key  # the file has a tRNS key
    assert opened.convert("RGBA").getpixel((0, 0))[3] == 0  # Pillow itself reads the key as alpha 0
    pixels = decode(data).pixels
    assert tuple(pixels[0, 0]) == WHITE


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_not_clipped(fmt: str) -> None:
    values = [0, 257, 32896, 65535, 1000]
    data = encode(gray16(values), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    pixels = decode(data).pixels
    assert pixels.shape == (1, len(values), 3)
    # Scaled by 255/65535: 65535 -> 255 and 32896 -> 128; clipping would give 255 for all but 0.
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255, 4]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [((0, 0, 0, 0), WHITE), ((0, 0, 0, 255), (0, 0, 0)), ((255, 0, 0, 0), (0, 255, 255))],
    ids=["white", "black", "cyan"],
)
def test_cmyk_jpeg_becomes_rgb(cmyk: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    data = encode(solid("CMYK", (8, 8), cmyk), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    got = np.array(first_pixel(data))
    assert np.abs(got - np.array(rgb)).max() <= 6, got


def _colour(pixel: np.ndarray) -> str:
    r, _, b = (int(v) for v in pixel)
    return "red" if r > 200 and b < 50 else "blue" if b > 200 and r < 50 else f"other{tuple(pixel)}"


# The fixture is 40x20, left half red and right half blue. `start`/`end` are the colours at the
# two ends of the long axis after decoding (x for a landscape result, y for a portrait one).
@pytest.mark.parametrize(
    ("orientation", "size", "start", "end"),
    [
        (1, (40, 20), "red", "blue"),  # stored as shown
        (3, (40, 20), "blue", "red"),  # rotate 180 to display
        (6, (20, 40), "red", "blue"),  # rotate 90 CW to display: the left edge goes to the top
        (8, (20, 40), "blue", "red"),  # rotate 90 CCW to display: the left edge goes to the bottom
    ],
)
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int], start: str, end: str) -> None:
    image = decode(exif_jpeg(orientation, width=40, height=20))
    assert (image.width, image.height) == size
    p = image.pixels
    first, last = (p[10, 2], p[10, -3]) if size[0] > size[1] else (p[2, 10], p[-3, 10])
    assert (_colour(first), _colour(last)) == (start, end)


# -- refusals --------------------------------------------------------------------------------


def test_zero_bytes_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode(b"")


@pytest.mark.parametrize(
    "data",
    [b"hello, this is not an image\n" * 4, b"\x00" * 100, b"%PDF-1.7\n", b"{}"],
    ids=["text", "zeros", "pdf-header", "json"],
)
def test_non_image_bytes_are_invalid_input(data: bytes) -> None:
    with pytest.raises(InvalidInput, match="not a decodable image") as err:
        decode(data)
    assert err.value.status_code == 400


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "GIF"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_pixel_data_is_invalid_input(fmt: str, fraction: float) -> None:
    data = encode(Image.fromarray(noise(64, 64)), fmt)
    with pytest.raises(InvalidInput, match=f"corrupt or truncated {fmt}") as err:
        decode(data[: int(len(data) * fraction)])
    assert err.value.status_code == 400


def test_corrupt_png_stream_is_invalid_input() -> None:
    data = bytearray(encode(Image.fromarray(noise(32, 32)), "PNG"))
    data[60:80] = b"\xff" * 20  # inside the compressed IDAT stream
    with pytest.raises(InvalidInput, match="corrupt or truncated PNG"):
        decode(bytes(data))


def _truncated(fmt: str, keep: int | None) -> bytes:
    data = encode(Image.fromarray(noise(24, 20)), fmt)
    return data[: keep if keep is not None else len(data) // 2]


@pytest.mark.parametrize(
    ("fmt", "keep"),
    [("JPEG", 100), ("PNG", 20), ("BMP", 20), ("WEBP", None)],
    ids=["JPEG-in-tables", "PNG-in-IHDR", "BMP-in-info-header", "WEBP-half"],
)
def test_truncated_header_is_invalid_input(fmt: str, keep: int | None) -> None:
    with pytest.raises(InvalidInput):
        decode(_truncated(fmt, keep))


@pytest.mark.parametrize("fmt", sorted(UNSUPPORTED_FORMATS))
def test_other_formats_pillow_opens_are_unsupported(fmt: str) -> None:
    data = encode(solid("RGB", (16, 16), (9, 9, 9)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow can read it; the service still refuses
    with pytest.raises(UnsupportedMediaType, match=fmt) as err:
        decode(data)
    assert err.value.status_code == 415
    assert "PNG" in err.value.message  # the message says what to send instead


@pytest.mark.parametrize(
    ("data", "declared"),
    [
        (png_declaring(100_000, 100_000), "100000x100000"),
        (png_declaring(2**31 - 1, 2), f"{2**31 - 1}x2"),
        (bmp_declaring(100_000, 100_000), "100000x100000"),
        (gif_declaring(65_535, 65_535), "65535x65535"),
        (jpeg_declaring(60_000, 60_000), "60000x60000"),
    ],
    ids=["png", "png-wide", "bmp", "gif", "jpeg"],
)
def test_declared_bomb_is_refused_from_the_header(data: bytes, declared: str) -> None:
    # The files hold a few bytes of pixel data: decoding would fail as corrupt (or allocate
    # gigabytes first), so PayloadTooLarge proves the header was checked before decoding.
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match=declared) as err:
        decode(data)
    assert time.perf_counter() - started < 1.0
    assert err.value.status_code == 413


def test_pixel_limit_is_inclusive() -> None:
    data = png(10, 10)
    assert decode(data, max_pixels=100).pixels.shape == (10, 10, 3)
    with pytest.raises(PayloadTooLarge, match="100 pixels; the limit is 99"):
        decode(data, max_pixels=99)


def test_pillows_own_bomb_check_if_switched_back_on_is_a_413(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service turns Pillow's decompression-bomb check off and checks the header itself; if
    something in the process sets `Image.MAX_IMAGE_PIXELS` again, Pillow's error is still a 413."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(PayloadTooLarge, match="decompression bomb") as err:
        decode(png(10, 10))  # 100 pixels > 2 x 10: Pillow raises while opening
    assert err.value.status_code == 413


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_multi_frame_files_are_invalid_input(fmt: str) -> None:
    data = multi_frame(fmt, frames=2)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2  # the fixture really has 2 frames
    with pytest.raises(InvalidInput, match=r"multi-frame .* not accepted; send one frame"):
        decode(data)


def test_single_frame_gif_is_accepted() -> None:
    data = image_bytes(9, 5, "GIF")
    assert decode(data).pixels.shape == (5, 9, 3)


# -- tensors and PNG ---------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(32, 32), (37, 53), (1, 1), (5, 300)])
def test_to_tensor_native_size(height: int, width: int) -> None:
    pixels = noise(width, height, seed=height * width)
    x = to_tensor(DecodedImage(pixels, "PNG"))
    assert x.shape == (1, 3, height, width)
    assert x.dtype == np.float32
    assert x.flags.c_contiguous
    # Channel-first, scaled to [0, 1], no other change.
    np.testing.assert_allclose(x[0], pixels.transpose(2, 0, 1) / 255.0, atol=1e-7)


@pytest.mark.parametrize(("src", "size"), [((37, 53), (32, 32)), ((8, 8), (32, 32)), ((64, 48), (16, 24))])
def test_to_tensor_resizes_to_height_width(src: tuple[int, int], size: tuple[int, int]) -> None:
    height, width = src
    pixels = gradient(width, height)
    x = to_tensor(DecodedImage(pixels, "PNG"), size)
    assert x.shape == (1, 3, *size)
    assert x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    # Resizing keeps the picture: the red channel still rises left to right.
    assert x[0, 0, :, -1].mean() > x[0, 0, :, 0].mean()


def test_to_tensor_resize_keeps_a_flat_colour() -> None:
    pixels = np.full((37, 53, 3), (10, 128, 250), np.uint8)
    x = to_tensor(DecodedImage(pixels, "PNG"), (32, 32))
    for c, v in enumerate((10, 128, 250)):
        np.testing.assert_allclose(x[0, c], v / 255.0, atol=1e-6)


def test_to_uint8_image_rounds_and_clips() -> None:
    chw = np.array([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 1.0, 1.7], np.float32).reshape(1, 1, 7).repeat(3, axis=0)
    out = to_uint8_image(chw)
    assert out.shape == (1, 7, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 0, 0, 1, 128, 255, 255]


@pytest.mark.parametrize(("height", "width"), [(1, 1), (5, 7), (37, 53), (64, 48)])
def test_encode_png_round_trip(height: int, width: int) -> None:
    pixels = noise(width, height, seed=3)
    data = encode_png(pixels)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (width, height)
        np.testing.assert_array_equal(np.asarray(img), pixels)
    np.testing.assert_array_equal(decode(data).pixels, pixels)
