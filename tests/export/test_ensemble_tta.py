"""scripts/ensemble_tta.py: one row per TTA mode, one column per run and one for their mean logits."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normserve.models.data import load_cifar10, to_tensor_nchw
from normserve.models.registry import ModelSpec
from normserve.models.training.classifier import build_classifier
from normserve.models.training.run_folder import save_run
from normserve.models.weights import WeightsInfo
from scripts import ensemble_tta


def _runs(root: Path, seeds: tuple[int, ...]) -> list[torch.nn.Module]:
    """Run folders as `normserve train` writes them, holding differently initialised tiny GNCNNs."""
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_classifier({"widths": [8, 8, 8], "depths": [1, 1, 1], "num_classes": 3}).eval()
        save_run(root / str(seed), ModelSpec("gncnn", model.config), model, WeightsInfo(trained=False))
        models.append(model)
    return models


def _unbalanced_zip(path: Path) -> Path:
    """train/ and test/ of three classes of noise images, 1, 3 and 6 of each: a classifier that
    always answers one class scores 10, 30 or 60 %."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for cls, count in (("a", 1), ("b", 3), ("c", 6)):
                for i in range(count):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                    zf.writestr(f"{split}/{cls}/{i}.png", buf.getvalue())
    return path


def test_table_matches_the_runs_logits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _unbalanced_zip(tmp_path / "data.zip")
    test = load_cifar10(data, None).test
    x, y = to_tensor_nchw(test.images).float() / 255, torch.from_numpy(test.labels).long()
    models = _runs(tmp_path, (0, 29))  # seeds whose two models and ensemble score 60, 10 and 30 %
    with torch.inference_mode():
        logits = [m(x) for m in models]
    want = [float((lg.argmax(1) == y).float().mean()) for lg in [*logits, torch.stack(logits).mean(0)]]
    assert len(set(want)) == 3, want  # the two runs and their ensemble score differently here

    ensemble_tta.main([str(tmp_path / "0"), str(tmp_path / "29"), "--data", str(data), "--cache-dir", ""])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines[2:]}
    assert list(rows) == ["none", "flip", "flip-translate"] and all(len(r) == 3 for r in rows.values())
    assert [float(v.strip().rstrip("%")) / 100 for v in rows["none"]] == pytest.approx(want, abs=5e-5)
