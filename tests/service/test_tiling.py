"""normserve.service.tiling: tile layout, blending windows and the tiled run, with real ONNX Runtime sessions
(a pointwise graph with a known answer, and the committed InstanceNorm denoiser)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import shipped
from onnx_graphs import pointwise_graph, session_runner

from normserve.service.imaging import float_to_uint8
from normserve.service.tasks import denoise
from normserve.service.tiling import (
    BLENDS,
    Blend,
    TiledImage,
    TileGrid,
    axis_starts,
    axis_weights,
    fits_one_tile,
)

Run = Callable[[np.ndarray], np.ndarray]
SIZES = [(37, 53), (53, 37), (64, 64), (65, 64), (100, 31), (5, 300), (129, 130), (200, 7)]


@pytest.fixture(scope="module")
def identity() -> Run:
    return session_runner(pointwise_graph())


@pytest.fixture(scope="module")
def affine() -> Run:
    return session_runner(pointwise_graph(scale=0.5, shift=0.25))


@pytest.fixture(scope="module")
def denoiser(committed_model_repository: Path) -> Run:
    return session_runner(committed_model_repository / "in_autoencoder" / shipped.DENOISER / "model.onnx")


def random_image(height: int, width: int, dtype: type = np.float32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype is np.uint8:
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return rng.random((height, width, 3), dtype=np.float32)


# -- layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 5, 31, 32, 33, 63, 64, 65, 100, 481, 1000, 6000])
@pytest.mark.parametrize(("tile", "overlap"), [(32, 0), (32, 8), (32, 16), (64, 31), (512, 64)])
def test_axis_starts_cover_the_axis_with_full_tiles(length: int, tile: int, overlap: int) -> None:
    starts = axis_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] == length - size  # full-size tiles, the last one shifted inward
    assert starts == sorted(set(starts))
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + size] = True
    assert covered.all()
    for a, b in itertools.pairwise(starts):
        assert a + size - b >= overlap, (a, b)  # neighbours share at least `overlap`
    if length > tile:  # and no more tiles than steps of tile - overlap need
        assert len(starts) == 1 + -(-(length - tile) // (tile - overlap))


@pytest.mark.parametrize(("length", "tile", "overlap"), [(0, 8, 0), (10, 0, 0), (10, 8, 8), (10, 8, -1)])
def test_axis_starts_refuses_nonsense(length: int, tile: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="overlap < tile"):
        axis_starts(length, tile, overlap)


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize(("length", "tile", "overlap"), [(100, 32, 8), (33, 32, 0), (481, 128, 32), (225, 128, 32)])
def test_axis_weights_sum_to_one_and_never_vanish(length: int, tile: int, overlap: int, blend: Blend) -> None:
    starts = axis_starts(length, tile, overlap)
    weights = axis_weights(starts, tile, length, blend)
    total = np.zeros(length)
    for s, w in zip(starts, weights, strict=True):
        assert w.shape == (tile,) and w.dtype == np.float32
        assert (w > 0).all()
        total[s : s + tile] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert weights[0][0] == pytest.approx(1.0) and weights[-1][-1] == pytest.approx(1.0)  # borders: full weight


@pytest.mark.parametrize("blend", ["cosine", "linear"])
def test_ramped_windows_hand_over_smoothly(blend: Blend) -> None:
    # Two tiles of 32 on an axis of 48 share 16 pixels: the first fades out where the second fades in.
    w0, w1 = axis_weights(axis_starts(48, 32, 16), 32, 48, blend)
    assert np.all(np.diff(w0[16:]) < 0) and np.all(np.diff(w1[:16]) > 0)
    np.testing.assert_allclose(w0[:16], 1.0)
    np.testing.assert_allclose(w1[16:], 1.0)


def test_grid_is_row_major_over_both_axes() -> None:
    grid = TileGrid.plan(100, 70, 32, 8)
    assert (grid.tile_h, grid.tile_w) == (32, 32)
    assert len(grid) == len(grid.ys) * len(grid.xs) == 4 * 3
    assert [grid.cell(i) for i in range(4)] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert TileGrid.plan(20, 700, 32, 8).tile_h == 20  # a short axis is one tile of its length


def test_unknown_blend_is_refused() -> None:
    with pytest.raises(ValueError, match="blend must be one of"):
        TileGrid.plan(100, 100, 32, 8, "gaussian")  # type: ignore[arg-type]


# -- the tiled run, through ONNX Runtime --------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), SIZES)
@pytest.mark.parametrize("blend", BLENDS)
def test_identity_model_gives_back_the_input(identity: Run, height: int, width: int, blend: Blend) -> None:
    image = random_image(height, width)
    out = denoise(identity, image, 32, 8, 3, blend)
    assert out.shape == image.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, image, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_uint8_image_round_trips_exactly(identity: Run, height: int, width: int) -> None:
    image = random_image(height, width, np.uint8)
    out = denoise(identity, image, 24, 6, 4)
    np.testing.assert_array_equal(float_to_uint8(out), image)


@pytest.mark.parametrize(("height", "width"), [(37, 53), (129, 130)])
def test_pointwise_model_is_unchanged_by_tiling(affine: Run, height: int, width: int) -> None:
    image = random_image(height, width)
    whole = affine(image.transpose(2, 0, 1)[None])[0].transpose(1, 2, 0)
    np.testing.assert_allclose(denoise(affine, image, 32, 12, 2), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("height", "width", "tile"), [(37, 53, 53), (40, 40, 64), (5, 5, 16)])
def test_image_within_one_tile_runs_whole(denoiser: Run, height: int, width: int, tile: int) -> None:
    assert fits_one_tile(height, width, tile)
    image = random_image(height, width)
    whole = denoiser(image.transpose(2, 0, 1)[None])[0].transpose(1, 2, 0)
    np.testing.assert_array_equal(denoise(denoiser, image, tile, 8, 4), whole)


def test_denoiser_tiles_independently_of_batch_size(denoiser: Run) -> None:
    # InstanceNorm normalises each sample on its own, so how tiles are batched must not matter.
    image = random_image(90, 70, np.uint8)
    one = denoise(denoiser, image, 32, 8, 1)
    for batch in (3, 100):
        np.testing.assert_allclose(denoise(denoiser, image, 32, 8, batch), one, rtol=0, atol=1e-5)


def test_denoiser_output_depends_on_the_tiling(denoiser: Run) -> None:
    # Per-tile InstanceNorm statistics: a tiled run is not the whole-image run (why the gap is measured).
    image = random_image(90, 70, np.uint8)
    whole = denoise(denoiser, image, 128, 8, 4)
    tiled = denoise(denoiser, image, 32, 8, 4)
    assert tiled.shape == whole.shape
    assert np.abs(tiled - whole).mean() > 1e-3
    assert tiled.min() >= 0.0 and tiled.max() <= 1.0


def test_tiles_hold_the_image_pixels() -> None:
    image = random_image(50, 40, np.uint8)
    job = TiledImage(image, 16, 4)
    x = job.tensor(range(len(job.grid)))
    assert x.shape == (len(job.grid), 3, 16, 16) and x.dtype == np.float32
    for k in range(len(job.grid)):
        i, j = job.grid.cell(k)
        crop = image[job.grid.ys[i] : job.grid.ys[i] + 16, job.grid.xs[j] : job.grid.xs[j] + 16]
        np.testing.assert_allclose(x[k], crop.transpose(2, 0, 1) / 255.0, atol=1e-7)


def test_wrong_model_output_shape_is_an_error() -> None:
    job = TiledImage(random_image(50, 40), 16, 4)
    chunk = job.chunks(2)[0]
    with pytest.raises(ValueError, match="model output is"):
        job.add(chunk, np.zeros((2, 3, 8, 8), np.float32))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((10, 10), np.float32), "must be \\(H, W, 3\\)"),
        (np.zeros((10, 10, 4), np.float32), "must be \\(H, W, 3\\)"),
        (np.zeros((10, 10, 3), np.float64), "uint8 or float32"),
    ],
)
def test_bad_images_are_refused(image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TiledImage(image, 8, 2)


def test_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch must be >= 1"):
        TiledImage(random_image(20, 20), 8, 2).chunks(0)
