"""Tiled inference for large images: the layout and blending of overlapping tiles of one shape,
for a fully convolutional image-to-image model run in batches of tiles (the loop that runs the
model over them is `service.tasks.tiled_run`).

Memory is bounded by tile × batch, whatever the image size. Tiles are spread evenly along each
axis (after MONAI's `sliding_window_inference`) and blended with a window whose weights add up to 1
at every pixel, so an identity model gives back its input exactly. Layout, blending and what
tiling does to an InstanceNorm model's output (`scripts/tile_gap.py`): docs/design/tiling.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Blend = Literal["cosine", "linear", "flat"]
BLENDS: tuple[Blend, ...] = ("cosine", "linear", "flat")


def fits_one_tile(height: int, width: int, tile: int) -> bool:
    """An image within one tile runs whole: no tiling, no blending, the same result as before."""
    return height <= tile and width <= tile


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the tiles covering [0, length): first 0, last `length - tile`, spread evenly,
    neighbours sharing at least `overlap` pixels. One tile at 0 when `length <= tile`."""
    if length < 1 or tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need length >= 1, tile >= 1 and 0 <= overlap < tile; got {length}, {tile}, {overlap}")
    if length <= tile:
        return [0]
    gaps = -(-(length - tile) // (tile - overlap))  # ceil: steps of at most tile - overlap
    span = length - tile
    return [(i * span + gaps // 2) // gaps for i in range(gaps + 1)]  # rounded i * span / gaps


def _ramp(n: int, blend: Blend) -> np.ndarray:
    """n weights rising from near 0 to near 1 (never 0): the up-ramp over a shared region."""
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    if blend == "cosine":
        return np.asarray(0.5 - 0.5 * np.cos(np.pi * t))
    if blend == "linear":
        return t
    return np.ones(n)


def axis_weights(starts: list[int], tile: int, length: int, blend: Blend) -> list[np.ndarray]:
    """One window per tile along one axis, normalised so the windows sum to 1 at every position."""
    windows = []
    for k, start in enumerate(starts):
        w = np.ones(tile)
        if k > 0:  # ramp up across what this tile shares with the previous one
            shared = min(starts[k - 1] + tile - start, tile // 2)
            w[:shared] *= _ramp(shared, blend)
        if k < len(starts) - 1:  # and down across what it shares with the next one
            shared = min(start + tile - starts[k + 1], tile // 2)
            w[tile - shared :] *= _ramp(shared, blend)[::-1]
        windows.append(w)
    total = np.zeros(length)
    for start, w in zip(starts, windows, strict=True):
        total[start : start + tile] += w
    return [(w / total[s : s + tile]).astype(np.float32) for s, w in zip(starts, windows, strict=True)]


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of an H x W image lie, and their blending windows."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: list[int]
    xs: list[int]
    wy: list[np.ndarray] = field(repr=False)
    wx: list[np.ndarray] = field(repr=False)

    @classmethod
    def plan(cls, height: int, width: int, tile: int, overlap: int, blend: Blend = "cosine") -> TileGrid:
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, not {blend!r}")
        tile_h, tile_w = min(tile, height), min(tile, width)
        ys, xs = axis_starts(height, tile, overlap), axis_starts(width, tile, overlap)
        return cls(
            height,
            width,
            tile_h,
            tile_w,
            ys,
            xs,
            axis_weights(ys, tile_h, height, blend),
            axis_weights(xs, tile_w, width, blend),
        )

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def cell(self, index: int) -> tuple[int, int]:
        """(row, column) of tile `index` in row-major order."""
        return divmod(index, len(self.xs))


class TiledImage:
    """One image being run tile by tile. Drive it as

        for chunk in job.chunks(batch):
            job.add(chunk, run(job.tensor(chunk)))
        out = job.output  # (H, W, 3) float32

    `tensor` and `add` are plain numpy, so an async caller can run them off the event loop and
    await the model in between (`service.tasks.tiled_run` is that loop, for every caller)."""

    def __init__(self, image: np.ndarray, tile: int, overlap: int, blend: Blend = "cosine") -> None:
        """`image` is (H, W, 3): uint8 (scaled by 1/255) or float32 (used as is)."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be (H, W, 3), got {image.shape}")
        if image.dtype not in (np.uint8, np.float32):
            raise ValueError(f"image must be uint8 or float32, got {image.dtype}")
        self.image = image
        self.grid = TileGrid.plan(image.shape[0], image.shape[1], tile, overlap, blend)
        self.output = np.zeros(image.shape, np.float32)

    def chunks(self, batch: int) -> list[range]:
        """Tile indices in groups of at most `batch`: one model call each."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        n = len(self.grid)
        return [range(i, min(i + batch, n)) for i in range(0, n, batch)]

    def tensor(self, chunk: range) -> np.ndarray:
        """The model input for these tiles: float32 (len(chunk), 3, tile_h, tile_w)."""
        g = self.grid
        x = np.empty((len(chunk), 3, g.tile_h, g.tile_w), np.float32)
        for row, index in enumerate(chunk):
            i, j = g.cell(index)
            crop = self.image[g.ys[i] : g.ys[i] + g.tile_h, g.xs[j] : g.xs[j] + g.tile_w]
            x[row] = crop.transpose(2, 0, 1)
        if self.image.dtype == np.uint8:
            x *= np.float32(1.0 / 255.0)
        return x

    def add(self, chunk: range, y: np.ndarray) -> None:
        """Blend the model's output for these tiles into the image."""
        g = self.grid
        expected = (len(chunk), 3, g.tile_h, g.tile_w)
        if y.shape != expected:
            raise ValueError(f"model output is {y.shape}; tiles need {expected}")
        for row, index in enumerate(chunk):
            i, j = g.cell(index)
            weight = g.wy[i][:, None, None] * g.wx[j][None, :, None]  # (tile_h, tile_w, 1)
            top = g.ys[i] - self._output_y0()
            view = self.output[top : top + g.tile_h, g.xs[j] : g.xs[j] + g.tile_w]
            view += y[row].transpose(1, 2, 0) * weight
            self._tile_added(i, j)

    def _output_y0(self) -> int:
        """The image row that `output`'s first row stands for."""
        return 0

    def _tile_added(self, i: int, j: int) -> None:
        """Called after tile (i, j) is blended in."""


class InPlaceTiles(TiledImage):
    """A TiledImage that writes its result, as uint8, over its own uint8 input, one band of tile
    rows at a time: the float accumulator is one tile row high (tile x W x 3), not image-sized.

    Rows above the next tile row's start are final once a tile row is added (no later tile covers
    them) and no later tile reads them, so they are rounded into `image` in place; the rest of
    the band moves up. Drive it as TiledImage, in chunk order; after the last chunk `image`
    holds the result (the same values as float_to_uint8 of TiledImage's output)."""

    def __init__(self, image: np.ndarray, tile: int, overlap: int, blend: Blend = "cosine") -> None:
        if image.dtype != np.uint8 or not image.flags.writeable:
            raise ValueError("InPlaceTiles needs a writable uint8 image")
        self.image = image
        self.grid = TileGrid.plan(image.shape[0], image.shape[1], tile, overlap, blend)
        self.output = np.zeros((self.grid.tile_h, image.shape[1], 3), np.float32)  # rows band_y0 ...
        self.band_y0 = 0

    def _output_y0(self) -> int:
        return self.band_y0

    def _tile_added(self, i: int, j: int) -> None:
        g = self.grid
        if j == len(g.xs) - 1:  # the tile row is complete
            self._finish_rows(g.ys[i + 1] if i + 1 < len(g.ys) else g.height)

    def _finish_rows(self, stop: int) -> None:
        """Round rows [band_y0, stop) into the image and move the band down to start at `stop`."""
        done = stop - self.band_y0
        band = self.output[:done]
        np.multiply(band, 255.0, out=band)
        np.rint(band, out=band)
        np.clip(band, 0, 255, out=band)
        self.image[self.band_y0 : stop] = band
        keep = len(self.output) - done
        self.output[:keep] = self.output[done:]  # numpy copies overlapping ranges correctly
        self.output[keep:] = 0
        self.band_y0 = stop


def tile_count(height: int, width: int, tile: int, overlap: int) -> int:
    return len(axis_starts(height, tile, overlap)) * len(axis_starts(width, tile, overlap))


def overhead(height: int, width: int, tile: int, overlap: int) -> float:
    """Pixels the model computes over pixels in the image (1.0 = no overlap cost)."""
    th, tw = min(tile, height), min(tile, width)
    return tile_count(height, width, tile, overlap) * th * tw / (height * width)
