"""`normserve eval classifier` on tiny synthetic CIFAR-style data through the real ORT session:
accuracy against a direct computation, labels mapped by name, the lossless-prefix .npz."""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from class_subset import write_class_subset
from eval_data import RepoFactory, save, session, smooth_image, version_dir

from normserve.evaluation.classifier import mcnemar_exact_p
from normserve.evaluation.cli import main

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
    # Seven of CIFAR-10's classes, as PNG: named by where they came from, not called CIFAR-10's JPEGs.
    assert f"| test/ of {data.name} ({len(set(truth))} classes) | 20 | 65.00 % |" in md
    assert (tmp_path / "out" / "classifier_confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("only_a", "only_b", "p"),
    [
        (0, 0, 1.0),  # no disagreement: no evidence either way
        (1, 0, 1.0),
        (3, 3, 1.0),
        (5, 0, 2 / 32),  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
        (0, 5, 2 / 32),
        (2, 8, 2 * (1 + 10 + 45) / 1024),  # 2 * P(X <= 2), X ~ Bin(10, 1/2)
        (8, 2, 2 * (1 + 10 + 45) / 1024),
    ],
)
def test_mcnemar_exact_p_is_the_two_sided_binomial_tail(only_a: int, only_b: int, p: float) -> None:
    assert mcnemar_exact_p(only_a, only_b) == pytest.approx(p)


def test_mcnemar_exact_p_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="counts must be >= 0"):
        mcnemar_exact_p(-1, 3)


def test_compare_scores_another_version_on_the_same_images_with_labels_by_name(
    tmp_path: Path, model_repo: RepoFactory, committed_model_repository: Path
) -> None:
    """--compare VERSION --compare-repository R: each model is right or wrong by its own label order,
    and the counts of images only one of them gets right match a direct computation."""
    repo = model_repo("gncnn", labels=SHUFFLED)  # the newest committed version, labels reordered
    other_dir = min((committed_model_repository / "gncnn").iterdir(), key=lambda d: int(d.name))
    other_labels = json.loads((other_dir / "config.json").read_text())["labels"]
    rng = np.random.default_rng(3)
    images = [smooth_image(rng, 32, 32) for _ in range(24)]
    x = np.stack([im.astype(np.float32) / 255.0 for im in images]).transpose(0, 3, 1, 2)
    other_session = ort.InferenceSession(str(other_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    other_pred = np.argmax(other_session.run(["logits"], {"image": x})[0], axis=1)
    pred = direct_predictions(repo, images)
    truth = [SHUFFLED[p] if i % 3 else SHUFFLED[(p + 1) % 10] for i, p in enumerate(pred)]
    right = np.asarray([SHUFFLED[p] == t for p, t in zip(pred, truth, strict=True)])
    other_right = np.asarray([other_labels[p] == t for p, t in zip(other_pred, truth, strict=True)])
    for i, (im, label) in enumerate(zip(images, truth, strict=True)):
        save(im, tmp_path / "d" / "test" / label / f"{i:04d}.png")

    args = ("--no-npz", "--compare", other_dir.name, "--compare-repository", str(committed_model_repository))
    result = run_eval(repo, tmp_path / "d", tmp_path / "out", *args)
    cmp = result["results"]["comparison"]
    assert cmp["other"] == f"gncnn/{other_dir.name}"
    assert cmp["model"]["onnx_sha256"] == hashlib.sha256((other_dir / "model.onnx").read_bytes()).hexdigest()
    assert cmp["images"] == 24 and result["results"]["sets"]["test"]["correct"] == int(right.sum()) == 16
    assert cmp["other_top1"] == pytest.approx(other_right.mean())
    only_this, only_other = int((right & ~other_right).sum()), int((~right & other_right).sum())
    assert (cmp["only_this_right"], cmp["only_other_right"]) == (only_this, only_other)
    assert cmp["both_right"] + cmp["both_wrong"] + only_this + only_other == 24
    assert cmp["mcnemar_exact_p"] == pytest.approx(mcnemar_exact_p(only_this, only_other))
    md = (tmp_path / "out" / "classifier.md").read_text()
    assert f"{only_this:,} only this one gets right, {only_other:,} only gncnn/{other_dir.name}" in md


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


def test_own_two_class_data_needs_no_denoiser_packages_and_is_named(
    tmp_path: Path, committed_model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's own 2-class model and data: no scikit-image or scipy is asked for (or imported),
    the report names the data it was given (not CIFAR-10), and top-5 is left out (2 classes)."""
    repo = tmp_path / "repo"
    write_class_subset(repo, committed_model_repository / "gncnn" / "7", ["cat", "ship"])
    rng = np.random.default_rng(1)
    for i in range(6):
        save(smooth_image(rng, 40, 30), tmp_path / "my_photos" / "test" / ("cat", "ship")[i % 2] / f"{i}.png")

    real_find_spec = importlib.util.find_spec
    blocked = ("skimage", "scipy")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name.split(".")[0] in blocked:
                raise ImportError(f"{name} is not installed in this test")

    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in blocked else real_find_spec(name, *a)
    )
    monkeypatch.setattr(sys, "meta_path", [Block(), *sys.meta_path])
    for name in [m for m in sys.modules if m.split(".")[0] in blocked]:
        monkeypatch.delitem(sys.modules, name)

    result = run_eval(repo, tmp_path / "my_photos", tmp_path / "out")
    test = result["results"]["sets"]["test"]
    assert test["name"] == "test/ of my_photos (2 classes)" and test["images"] == 6
    assert test["top5"] is None and "lossless_prefix" not in result["results"]["sets"]
    assert result["headline"]["data"] == str(tmp_path / "my_photos") and "test_top1" in result["headline"]
    md = (tmp_path / "out" / "classifier.md").read_text()
    assert "CIFAR" not in md and "top-5" not in md, md
    assert f"Data: `{tmp_path / 'my_photos'}`" in md and "| test/ of my_photos (2 classes) | 6 |" in md
