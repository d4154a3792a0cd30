"""scripts/tile_gap.py on the shipped denoiser: a tile that holds the image is the whole image,
smaller tiles move the output, and every valid configuration gets a row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normserve.service.tiling import tile_count
from scripts import tile_gap


@pytest.fixture
def clean_folder(tmp_path: Path) -> Path:
    """Two smooth 72x56 colour images (noise is added by the script)."""
    folder = tmp_path / "clean"
    folder.mkdir()
    yy, xx = np.mgrid[0:56, 0:72]
    for k in range(2):
        channels = [128 + 100 * np.sin((xx + 7 * c + 13 * k) / 9.0) * np.cos(yy / (11.0 + c)) for c in range(3)]
        Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8)).save(folder / f"img{k}.png")
    return folder


def run_report(model: Path, data: Path, out: Path, *args: str) -> dict:
    argv = ["--model", str(model), "--data", str(data), "--json", str(out), "--threads", "1", *args]
    assert tile_gap.main(argv) == 0
    report: dict = json.loads(out.read_text())
    return report


def test_tiles_that_hold_the_image_match_it_and_smaller_ones_move_it(
    committed_model_repository: Path, clean_folder: Path, tmp_path: Path
) -> None:
    model = max((committed_model_repository / "in_autoencoder").iterdir(), key=lambda p: int(p.name))
    report = run_report(model, clean_folder, tmp_path / "r.json", "--tiles", "32,96", "--overlaps", "0,16,20")
    assert report["images"] == 2
    assert report["psnr_whole"] > report["psnr_noisy"] + 5  # the trained model denoises (34 vs 20 dB)
    rows = {(r["tile"], r["overlap"], r["blend"]): r for r in report["rows"]}
    # 2 * overlap > tile is skipped: 32/20 has no row.
    assert sorted(rows) == [
        (32, 0, "cosine"),
        (32, 16, "cosine"),
        (96, 0, "cosine"),
        (96, 16, "cosine"),
        (96, 20, "cosine"),
    ]
    for (tile, overlap, _), row in rows.items():
        assert row["tiles_per_image"] == tile_count(56, 72, tile, overlap)
        assert row["psnr_whole"] == report["psnr_whole"]
    for overlap in (0, 16, 20):
        whole = rows[(96, overlap, "cosine")]
        assert whole["tiles_per_image"] == 1 and whole["compute_overhead"] == 1.0
        assert whole["gap_db"] == 0.0 and math.isinf(whole["psnr_vs_whole"])
    for overlap in (0, 16):
        tiled = rows[(32, overlap, "cosine")]
        assert tiled["tiles_per_image"] > 1
        assert tiled["psnr_vs_whole"] < 50  # InstanceNorm per tile moves the output (about 31 dB)
        assert tiled["abs_gap_db"] > 0.5  # about 4 dB on tiles this small
    # 72x56 in tiles of 32: 3x2 tiles at overlap 0 (spread evenly, so they still overlap), 4x3 at 16.
    assert rows[(32, 16, "cosine")]["tiles_per_image"] > rows[(32, 0, "cosine")]["tiles_per_image"]
    assert rows[(32, 16, "cosine")]["compute_overhead"] > rows[(32, 0, "cosine")]["compute_overhead"]


def test_unknown_blend_is_a_usage_error(clean_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        tile_gap.main(["--model", str(tmp_path), "--data", str(clean_folder), "--blends", "cosine,gaussian"])
    assert exc.value.code == 2
