"""Training loops on tiny synthetic data: loss goes down, the run folder holds checkpoint, metrics,
curve and trained safetensors, resuming continues exactly where an interrupted run stopped."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from normserve.files import sha256_file
from normserve.models import train, train_args
from normserve.models.gncnn import GNCNN
from normserve.models.registry import ModelSpec, build_model
from normserve.models.train import config_from_args
from normserve.models.train_args import add_train_arguments
from normserve.models.training import optim
from normserve.models.training.classifier import build_classifier, train_classifier
from normserve.models.training.config import ClassifierTrainConfig, DenoiserTrainConfig
from normserve.models.training.denoiser import build_denoiser, train_denoiser
from normserve.models.training.distill import distillation_loss, load_teacher
from normserve.models.training.run_folder import CHECKPOINT, CURVE, METRICS, SPEC, WEIGHTS, save_run
from normserve.models.weights import WeightsInfo, read_weights_info

TINY_GNCNN = {"widths": [8, 8, 8], "depths": [1, 1, 1]}
TINY_AE = {"base": 4, "bottleneck_depth": 1, "skips": True, "residual": True}


def _cls_cfg(data: Path, out: Path, **kw: object) -> ClassifierTrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        epochs=1,
        batch_size=4,
        lr=0.05,
        cache_dir="",
        progress=False,
        model=TINY_GNCNN,
        eval_subset=0,
    )
    base.update(kw)
    return ClassifierTrainConfig(**base)  # type: ignore[arg-type]


def test_classifier_run_writes_everything(cifar_zip: Path, cifar_zip_classes: list[str], tmp_path: Path) -> None:
    summary = train_classifier(_cls_cfg(cifar_zip, tmp_path, epochs=2, command="pytest"))
    for name in (CHECKPOINT, METRICS, CURVE, WEIGHTS, SPEC):
        assert (tmp_path / name).is_file(), name
    history = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # solid-colour classes are easy
    assert 0.0 <= history[-1]["test_acc"] <= 1.0
    info = read_weights_info(tmp_path / WEIGHTS)
    assert info.trained is True and info.labels == cifar_zip_classes
    assert info.extra["epochs"] == 2 and info.extra["command"] == "pytest"
    assert {"wall_time_s", "hardware", "final_metrics", "train_config"} <= info.extra.keys()
    assert summary["final_metrics"]["test_acc"] == history[-1]["test_acc"]
    # The written spec + weights rebuild the model strictly; config.json names the labels too,
    # and the weights carry the same spec, so `normserve export` needs no --config.
    run_config = json.loads((tmp_path / SPEC).read_text())
    assert run_config["labels"] == cifar_zip_classes
    spec = ModelSpec.from_dict(run_config)
    assert spec.config.num_classes == len(cifar_zip_classes)
    assert info.model == spec.to_dict() and info.spec() is not None
    build_model(spec, tmp_path / WEIGHTS)


@pytest.mark.parametrize("kind", ["gncnn", "in_autoencoder"])
def test_training_defaults_to_the_served_architecture(repo_root: Path, kind: str) -> None:
    """Without --model, `normserve train` builds what models/configs/<kind>.json (the served
    recipe) describes; for the classifier only the class count comes from the data."""
    shipped = json.loads((repo_root / "models" / "configs" / f"{kind}.json").read_text())["config"]
    if kind == "gncnn":
        built = build_classifier({"num_classes": 2}).config.to_dict()
        assert {**built, "num_classes": shipped["num_classes"]} == ModelSpec.from_dict(
            {"kind": kind, "config": shipped}
        ).config.to_dict()
        assert built["num_classes"] == 2
    else:
        built = build_denoiser({}).config.to_dict()
        assert built == ModelSpec.from_dict({"kind": kind, "config": shipped}).config.to_dict()


def test_a_folder_of_a_few_photos_of_any_size_trains(tmp_path: Path) -> None:
    """A user's own folder: two classes, three images each of another size than 32x32, fewer
    images than one batch. It trains (one smaller batch per epoch) and the images are resized."""
    for split, count in (("train", 3), ("test", 1)):
        for cls, colour in (("boat", (30, 60, 200)), ("kitty", (200, 120, 40))):
            folder = tmp_path / "photos" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (50 + i, 40), colour).save(folder / f"{i}.jpg")
    summary = train_classifier(
        _cls_cfg(tmp_path / "photos", tmp_path / "run", batch_size=128, model={"widths": [8, 8, 8]})
    )
    assert summary["steps"] == 1 and summary["labels"] == ["boat", "kitty"]
    assert json.loads((tmp_path / "run" / SPEC).read_text())["labels"] == ["boat", "kitty"]


def test_resume_matches_uninterrupted_run(cifar_zip: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train_classifier(_cls_cfg(cifar_zip, straight, epochs=2))
    sliced = tmp_path / "sliced"
    train_classifier(_cls_cfg(cifar_zip, sliced, epochs=2, stop_after=1))
    ckpt = torch.load(sliced / CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 1
    summary = train_classifier(_cls_cfg(cifar_zip, sliced, epochs=2, resume=True))
    assert summary["epochs"] == 2
    lines = (sliced / METRICS).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    a, b = load_file(str(straight / WEIGHTS)), load_file(str(sliced / WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_averaging_writes_the_mean_of_the_last_epochs_weights(cifar_zip: Path, tmp_path: Path) -> None:
    """SWA: the written weights are the mean of the weights after epochs 2 and 3 (each read from the
    checkpoint of a run sliced epoch by epoch), and a resumed run restores the running average."""
    sliced = tmp_path / "sliced"
    iterates = []
    for _ in range(3):
        train_classifier(_cls_cfg(cifar_zip, sliced, epochs=3, average_from=2, stop_after=1, resume=True))
        iterates.append(torch.load(sliced / CHECKPOINT, weights_only=True)["model"])
    written = load_file(str(sliced / WEIGHTS))
    assert written.keys() == iterates[-1].keys()
    for k in written:
        torch.testing.assert_close(written[k], (iterates[1][k] + iterates[2][k]) / 2, rtol=0, atol=1e-6)
    assert any(not torch.equal(written[k], iterates[2][k]) for k in written)  # not just the last weights
    history = [json.loads(line) for line in (sliced / METRICS).read_text().splitlines()]
    assert ["averaged" in r for r in history] == [False, True, True]
    assert [r.get("averaged") for r in history[1:]] == [1, 2]
    assert {"test_acc", "iterate_test_acc"} <= history[-1].keys()
    info = read_weights_info(sliced / WEIGHTS)
    assert info.extra["averaged_epochs"] == [2, 3]
    assert info.extra["final_metrics"]["test_acc"] == history[-1]["test_acc"]
    # The same run in one go writes the same average.
    straight = tmp_path / "straight"
    train_classifier(_cls_cfg(cifar_zip, straight, epochs=3, average_from=2))
    for k, v in load_file(str(straight / WEIGHTS)).items():
        torch.testing.assert_close(v, written[k], rtol=0, atol=1e-6)


def test_averaging_settings_are_checked(cifar_zip: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"average_from must lie in \[0, epochs=2\]"):
        train_classifier(_cls_cfg(cifar_zip, tmp_path / "a", epochs=2, average_from=3))
    train_classifier(_cls_cfg(cifar_zip, tmp_path / "b", epochs=2, stop_after=1))
    with pytest.raises(ValueError, match="holds no averaged weights"):
        train_classifier(_cls_cfg(cifar_zip, tmp_path / "b", epochs=2, average_from=1, resume=True))


def test_init_from_starts_where_the_given_weights_are(cifar_zip: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    train_classifier(_cls_cfg(cifar_zip, first, epochs=1))
    # lr 0: a fine-tune that cannot move the weights must end exactly at the weights it started from.
    tuned = tmp_path / "tuned"
    summary = train_classifier(
        _cls_cfg(cifar_zip, tuned, init_from=str(first / WEIGHTS), lr=0.0, weight_decay=0.0, cutout=8)
    )
    a, b = load_file(str(first / WEIGHTS)), load_file(str(tuned / WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert summary["train_config"]["init_from"] == str(first / WEIGHTS)
    # Without it the run starts from a random init, so the weights differ.
    fresh = tmp_path / "fresh"
    train_classifier(_cls_cfg(cifar_zip, fresh, lr=0.0, weight_decay=0.0, seed=1))
    c = load_file(str(fresh / WEIGHTS))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_init_from_refuses_weights_of_another_shape(cifar_zip: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    train_classifier(_cls_cfg(cifar_zip, first, epochs=1))
    wider = {"widths": [16, 8, 8], "depths": [1, 1, 1]}
    with pytest.raises(ValueError, match=r"does not fit this model: .*shape mismatch \['stem"):
        train_classifier(_cls_cfg(cifar_zip, tmp_path / "x", init_from=str(first / WEIGHTS), model=wider))


def test_denoiser_run(tmp_path: Path) -> None:
    images = tmp_path / "clean"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        smooth = np.kron(rng.integers(0, 256, (5, 6, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 40x48 blocks
        Image.fromarray(smooth).save(images / f"{i}.png")
    cfg = DenoiserTrainConfig(
        data=str(images),
        test_data=str(images),
        out=str(tmp_path / "run"),
        epochs=2,
        batch_size=4,
        patch_size=16,
        patches_per_epoch=16,
        progress=False,
        model=TINY_AE,
        eval_limit=2,
    )
    summary = train_denoiser(cfg)
    history = [json.loads(line) for line in (tmp_path / "run" / METRICS).read_text().splitlines()]
    assert len(history) == 2 and "psnr_sigma25" in history[-1] and "noisy_psnr_sigma25" in history[-1]
    assert np.isfinite(history[-1]["train_loss"])
    info = read_weights_info(tmp_path / "run" / WEIGHTS)
    assert info.trained is True and info.labels is None
    assert summary["final_metrics"]["psnr_sigma25"] == history[-1]["psnr_sigma25"]
    spec = ModelSpec.from_dict(json.loads((tmp_path / "run" / SPEC).read_text()))
    assert spec.kind == "in_autoencoder" and spec.config.skips and spec.config.residual


def test_one_step_reduces_denoiser_loss() -> None:
    """A few optimizer steps on one fixed batch lower the loss (gradients reach every block)."""
    torch.manual_seed(0)
    model = build_denoiser(TINY_AE)
    clean = torch.rand(2, 3, 16, 16)
    noisy = clean + 0.1 * torch.randn_like(clean)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.mse_loss(model(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_cli_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        ["denoiser", "--data", "d", "--out", "o", "--epochs", "3", "--model", '{"skips": true}', "--bf16"]
    )
    cfg = config_from_args(args)
    assert isinstance(cfg, DenoiserTrainConfig)
    assert cfg.epochs == 3 and cfg.model == {"skips": True} and cfg.bf16 is True
    assert cfg.patch_size == DenoiserTrainConfig().patch_size  # unset options keep the task's defaults
    args = parser.parse_args(["classifier", "--data", "d", "--out", "o", "--cutout", "8", "--init-from", "w.st"])
    cfg = config_from_args(args)
    assert isinstance(cfg, ClassifierTrainConfig) and cfg.cutout == 8 and cfg.init_from == "w.st"
    args = parser.parse_args(["classifier", "--data", "d", "--out", "o", "--epochs", "9", "--average-from", "4"])
    assert config_from_args(args).average_from == 4
    args = parser.parse_args(["classifier", "--data", "d", "--out", "o"])
    cfg = config_from_args(args)
    assert isinstance(cfg, ClassifierTrainConfig) and cfg.cutout == 0 and cfg.init_from == ""
    assert cfg.teachers == [] and cfg.kd_alpha == 0.9
    args = parser.parse_args(
        ["classifier", "--data", "d", "--out", "o", "--teacher", "a", "--teacher", "b", "--kd-alpha", "1"]
    )
    cfg = config_from_args(args)
    assert isinstance(cfg, ClassifierTrainConfig) and cfg.teachers == ["a", "b"] and cfg.kd_alpha == 1.0


def test_cli_choices_are_the_training_tables() -> None:
    """The torch-free argument module names exactly the tables that the training code looks up."""
    assert set(train_args.OPTIMIZERS) == set(optim._OPTIMIZERS)
    assert set(train_args.SCHEDULES) == set(optim._SCHEDULES)
    assert set(train_args.TASKS) == set(train._TASKS)


@pytest.mark.parametrize("task", ["classifier", "denoiser"])
def test_each_task_has_its_own_options(task: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_args.build_parser().parse_args([task, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    mine, theirs = ("--teacher", "--patch-size") if task == "classifier" else ("--patch-size", "--teacher")
    assert mine in shown and theirs not in shown


def test_distillation_loss_terms_and_direction() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    # alpha 0 is the label loss alone; the KD term vanishes when the student equals the teacher.
    ce = torch.nn.functional.cross_entropy(student, y, label_smoothing=0.1)
    torch.testing.assert_close(distillation_loss(student, teacher, y, 0.0, 4.0, 0.1), ce)
    assert float(distillation_loss(teacher, teacher, y, 1.0, 4.0, 0.1)) == pytest.approx(0.0, abs=1e-6)
    # alpha 1 is T² · KL(teacher ‖ student) of the softened distributions, written out here.
    t = 2.0
    p_t, p_s = (teacher / t).softmax(1), (student / t).softmax(1)
    kl = float((p_t * (p_t.log() - p_s.log())).sum(1).mean()) * t * t
    assert kl > 0
    assert float(distillation_loss(student, teacher, y, 1.0, t, 0.0)) == pytest.approx(kl, rel=1e-5)
    # A gradient step on the KD term alone moves the student's softened distribution towards the teacher's.
    s = student.clone().requires_grad_(True)
    distillation_loss(s, teacher, y, 1.0, t, 0.0).backward()
    assert s.grad is not None
    q_s = ((s.detach() - 0.5 * s.grad) / t).softmax(1)
    assert float((p_t * (p_t.log() - q_s.log())).sum(1).mean()) * t * t < kl


def test_distilling_from_itself_leaves_the_weights_alone(cifar_zip: Path, tmp_path: Path) -> None:
    """A student that starts as its teacher (GroupNorm: train and eval modes compute the same) has a
    zero KD gradient, so pure distillation keeps every weight; the label loss alone moves them."""
    teacher = tmp_path / "teacher"
    train_classifier(_cls_cfg(cifar_zip, teacher, epochs=1))
    common = dict(init_from=str(teacher / WEIGHTS), weight_decay=0.0, augment_pad=4, cutout=8)
    summary = train_classifier(
        _cls_cfg(cifar_zip, tmp_path / "kd", teachers=[str(teacher)], kd_alpha=1.0, **common)  # type: ignore[arg-type]
    )
    assert summary["train_config"]["teachers"] == [str(teacher)]
    recorded = read_weights_info(tmp_path / "kd" / WEIGHTS).extra["teacher_weights_sha256"]
    assert recorded == {str(teacher): sha256_file(teacher / WEIGHTS)}
    t, kd = load_file(str(teacher / WEIGHTS)), load_file(str(tmp_path / "kd" / WEIGHTS))
    for k in t:
        torch.testing.assert_close(kd[k], t[k], rtol=0, atol=1e-7)
    train_classifier(_cls_cfg(cifar_zip, tmp_path / "ce", teachers=[str(teacher)], kd_alpha=0.0, **common))  # type: ignore[arg-type]
    ce = load_file(str(tmp_path / "ce" / WEIGHTS))
    assert any(not torch.equal(ce[k], t[k]) for k in t)


def test_teacher_must_match_the_data(cifar_zip: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    train_classifier(_cls_cfg(cifar_zip, teacher, epochs=1))
    seven = build_classifier({**TINY_GNCNN, "num_classes": 7})
    save_run(tmp_path / "other", ModelSpec("gncnn", seven.config), seven, WeightsInfo(trained=True))
    with pytest.raises(ValueError, match="7 classes; the data has 3"):
        train_classifier(_cls_cfg(cifar_zip, tmp_path / "kd", teachers=[str(tmp_path / "other")]))
    with pytest.raises(ValueError, match="kd_alpha must lie in"):
        train_classifier(_cls_cfg(cifar_zip, tmp_path / "kd", teachers=[str(teacher)], kd_alpha=1.5))


def test_committed_teacher_is_a_usable_run_folder(repo_root: Path) -> None:
    """The kept teacher (docs/models/gncnn.md, "Tried and not shipped") loads as `--teacher` does, with the
    weights its card names, and classifies the ten CIFAR-10 classes."""
    teacher_dir = repo_root / "models" / "teachers" / "gncnn_air_e38"
    assert sha256_file(teacher_dir / "weights.safetensors").startswith("fe4343fe743e")
    info = read_weights_info(teacher_dir / "weights.safetensors")
    assert info.trained and info.labels is not None and len(info.labels) == 10
    teacher = load_teacher([str(teacher_dir)], 10)
    member = teacher.members[0]
    assert isinstance(member, GNCNN) and member.config.downsample == "conv_maxpool"
    with torch.no_grad():
        logits = teacher(torch.rand(4, 3, 32, 32))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
