"""`normserve eval classifier` on tiny synthetic CIFAR-style data through the real ORT session:
accuracy against a direct computation, labels mapped by name, the lossless-prefix .npz."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from eval_data import RepoFactory, save, session, smooth_image, version_dir

from evaluation.cli import main

CIFAR_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The model's labels in an order unlike the folders' sorted order: mapping by position would fail.
SHUFFLED = [CIFAR_LABELS[i] for i in (7, 2, 9, 0, 5, 3, 8, 1, 6, 4)]


def direct_predictions(repo: Path, images: list[np.ndarray]) -> np.ndarray:
    x = np.stack([im.astype(np.float32) / 255.0 for im in images]).transpose(0, 3, 1, 2)
    return np.argmax(session(repo, "gncnn").run(["logits"], {"image": x})[0], axis=1)


def run_eval(repo: Path, data: Path, out: Path, *extra: str) -> dict:
    rc = main(
        ["classifier", "--repository", str(repo), "--data", str(data), "--out", str(out), "--latency-runs", "1", *extra]
    )
    assert rc == 0
    return json.loads((out / "classifier.json").read_text())


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_accuracy_matches_direct_computation_with_labels_by_name(
    layout: str, tmp_path: Path, model_repo: RepoFactory
) -> None:
    repo = model_repo("gncnn", labels=SHUFFLED)
    rng = np.random.default_rng(0)
    images = [smooth_image(rng, 32, 32) for _ in range(20)]
    pred = direct_predictions(repo, images)
    # 13 images filed under the class the model predicts, 7 under another one: top-1 must be 13/20.
    truth = [SHUFFLED[p] if i < 13 else SHUFFLED[(p + 1 + i % 9) % 10] for i, p in enumerate(pred)]
    assert (np.asarray([SHUFFLED.index(t) for t in truth]) == pred).sum() == 13  # the fixture itself
    tree = tmp_path / "cifar"
    for i, (im, label) in enumerate(zip(images, truth, strict=True)):
        save(im, tree / "test" / label / f"{i:04d}.png")
    data = tree
    if layout == "zip":
        data = tmp_path / "cifar.zip"
        with zipfile.ZipFile(data, "w") as zf:
            for f in sorted(tree.rglob("*.png")):
                zf.write(f, f"CIFAR-10-images/{f.relative_to(tree)}")

    result = run_eval(repo, data, tmp_path / "out", "--no-npz", "--batch-size", "8")
    test = result["results"]["sets"]["test"]
    assert test["images"] == 20
    assert test["correct"] == 13
    assert test["top1"] == pytest.approx(0.65)
    confusion = np.asarray(test["confusion"])
    assert confusion.sum() == 20 and np.trace(confusion) == 13
    for label in set(truth):  # rows are in the model's label order
        assert confusion[SHUFFLED.index(label)].sum() == truth.count(label)
        assert test["per_class"][label]["images"] == truth.count(label)
    assert result["results"]["labels"] == SHUFFLED
    served_config = json.loads(next((repo / "gncnn").glob("*/config.json")).read_text())
    assert result["model"]["onnx_sha256"] and result["model"]["trained"] is served_config["weights"]["trained"]
    assert result["results"]["latency"]["batch"] == 32
    md = (tmp_path / "out" / "classifier.md").read_text()
    assert "| CIFAR-10 test, JPEG (about quality 75) | 20 | 65.00 % |" in md
    assert (tmp_path / "out" / "classifier_confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_data_class_is_an_error(
    tmp_path: Path, model_repo: RepoFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = model_repo("gncnn")
    save(smooth_image(np.random.default_rng(1), 32, 32), tmp_path / "d" / "test" / "cat" / "0000.png")
    save(smooth_image(np.random.default_rng(2), 32, 32), tmp_path / "d" / "test" / "zebra" / "0000.png")
    rc = main(
        [
            "classifier",
            "--repository",
            str(repo),
            "--data",
            str(tmp_path / "d"),
            "--no-npz",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "['zebra'] are not among the model's labels" in capsys.readouterr().err


def _canonical_npz(path: Path, images: list[np.ndarray], labels: list[int], all_labels: list[int]) -> None:
    rows = np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images])  # R, G, B planes
    np.savez(
        path,
        test_prefix_data=rows,
        test_prefix_labels=np.asarray(labels, np.uint8),
        labels_test_batch=np.asarray(all_labels, np.uint8),
        label_names=np.asarray(CIFAR_LABELS),
    )


@pytest.mark.parametrize("twins_match", [True, False])
def test_lossless_prefix_and_its_jpeg_twins(twins_match: bool, tmp_path: Path, model_repo: RepoFactory) -> None:
    repo = model_repo("gncnn")
    rng = np.random.default_rng(3)
    all_labels = [3, 8, 8, 0, 6, 6, 1, 3, 9, 0]  # the whole "test batch"; the first 6 are the lossless prefix
    images = [smooth_image(rng, 32, 32) for _ in all_labels]
    _canonical_npz(tmp_path / "c.npz", images[:6], all_labels[:6], all_labels)
    # The JPEG tree: test/<class>/<rank>.jpg is the rank-th image of that class in test-batch order.
    seen: dict[int, int] = {}
    for im, lab in zip(images, all_labels, strict=True):
        rank = seen.get(lab, 0)
        seen[lab] = rank + 1
        pixels = im if twins_match else smooth_image(rng, 32, 32)
        save(pixels, tmp_path / "t" / "test" / CIFAR_LABELS[lab] / f"{rank:04d}.jpg", quality=95)

    result = run_eval(repo, tmp_path / "t", tmp_path / "out", "--npz", str(tmp_path / "c.npz"))
    sets = result["results"]["sets"]
    pred = direct_predictions(repo, images[:6])
    assert sets["lossless_prefix"]["images"] == 6
    assert sets["lossless_prefix"]["correct"] == int((pred == np.asarray(all_labels[:6])).sum())
    assert sets["test"]["images"] == 10
    if twins_match:
        twins = sets["jpeg_twins_of_prefix"]
        assert twins["images"] == 6 and twins["pairing_psnr_db"] > 30
        assert (
            np.asarray(twins["confusion"]).sum(axis=1).tolist()
            == np.asarray(sets["lossless_prefix"]["confusion"]).sum(axis=1).tolist()
        )
    else:
        assert "jpeg_twins_of_prefix" not in sets  # different pictures under the twin names: no comparison


def test_update_config_refuses_a_partial_run(
    tmp_path: Path, model_repo: RepoFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = model_repo("gncnn")
    before = (version_dir(repo, "gncnn") / "config.json").read_bytes()
    rc = main(["classifier", "--repository", str(repo), "--limit", "5", "--update-config", "--out", str(tmp_path)])
    assert rc == 2
    assert "drop --limit" in capsys.readouterr().err
    assert (version_dir(repo, "gncnn") / "config.json").read_bytes() == before
