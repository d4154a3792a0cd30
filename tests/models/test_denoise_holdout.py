"""scripts/denoise_holdout.py: a disjoint train/val split of an image folder, by file name only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import denoise_holdout


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir()
    names = [f"{i:03d}.png" for i in range(n)]
    for name in names:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / name)
    return names


def test_split_is_disjoint_complete_and_repeatable(tmp_path: Path) -> None:
    names = _images(tmp_path / "src", 25)
    out = tmp_path / "split"
    assert denoise_holdout.split(tmp_path / "src", out, every=12) == (22, 3)
    val = sorted(p.name for p in (out / "val").iterdir())
    train = sorted(p.name for p in (out / "train").iterdir())
    assert val == [names[0], names[12], names[24]]
    assert sorted(val + train) == names
    assert all((out / "val" / v).resolve() == (tmp_path / "src" / v).resolve() for v in val)
    # Running it again (e.g. with another --every) replaces the links instead of adding to them.
    assert denoise_holdout.split(tmp_path / "src", out, every=5) == (20, 5)
    assert len(list((out / "train").iterdir())) == 20


@pytest.mark.parametrize("argv", [["missing", "out"], ["src", "out", "--every", "1"]])
def test_bad_arguments_end_in_a_usage_error(tmp_path: Path, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "src", 3)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        denoise_holdout.main(argv)
    assert exc.value.code == 2
