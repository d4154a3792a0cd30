"""`normserve eval classifier`: top-1 accuracy of the served classifier through ONNX Runtime.

Images go through the classification task /classify runs (service/tasks.py: `to_tensor` with
the model's `preprocessing.resize`), exactly as `/classify` prepares an upload (mean/std normalisation is inside the graph). Data classes are
mapped to the model's labels by name, never by position.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from normserve.contract import LOGITS_OUTPUT
from normserve.evaluation.datasets import CanonicalPrefix, LabelledImages, jpeg_keys_for_prefix
from normserve.evaluation.runtime import EvaluationError, model_facts, time_calls
from normserve.quality import psnr
from normserve.service.imaging import DecodedImage
from normserve.service.model import ServedModel
from normserve.service.tasks import ClassificationTask, task_of, top_k

log = logging.getLogger("normserve.eval")

LATENCY_BATCH = 32
MIN_PAIRING_PSNR = 20.0  # JPEG vs lossless of the same image: ~30 dB; of different images: ~10 dB


def label_indices(names: Sequence[str], model_labels: Sequence[str]) -> np.ndarray:
    """Index into the model's labels of each class name; an unknown name is an error."""
    position = {label: i for i, label in enumerate(model_labels)}
    unknown = sorted({n for n in names if n not in position})
    if unknown:
        raise EvaluationError(f"data classes {unknown} are not among the model's labels {list(model_labels)}")
    return np.asarray([position[n] for n in names], dtype=np.int64)


def predict_logits(model: ServedModel, images: Sequence[DecodedImage], batch_size: int) -> np.ndarray:
    """Logits (N, classes) for `images`, batched through the served session, each image prepared
    by the classification task /classify runs (service/tasks.py)."""
    return task_of(model, ClassificationTask).logits(images, batch_size)


@dataclass
class Scores:
    top1: float
    top5: float | None  # None for a model of 5 classes or fewer, where top-5 is always right
    correct: int
    images: int
    per_class: dict[str, dict[str, float]]  # class -> {"top1", "images"}
    confusion: np.ndarray  # (classes, classes): rows true, columns predicted, model label order

    def to_dict(self) -> dict[str, Any]:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "correct": self.correct,
            "images": self.images,
            "per_class": self.per_class,
            "confusion": self.confusion.tolist(),
        }


def score(logits: np.ndarray, true: np.ndarray, model_labels: Sequence[str]) -> Scores:
    """Top-1/top-5, per-class top-1 and the confusion matrix of `logits` against true label indices."""
    n_classes = len(model_labels)
    pred = np.argmax(logits, axis=1)
    top5 = top_k(logits, 5)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    n = len(true)
    per_class = {
        model_labels[c]: {"top1": float(confusion[c, c] / confusion[c].sum()), "images": int(confusion[c].sum())}
        for c in range(n_classes)
        if confusion[c].sum()
    }
    correct = int((pred == true).sum())
    return Scores(
        top1=correct / n if n else float("nan"),
        top5=None if n_classes <= 5 else float((top5 == true[:, None]).any(axis=1).mean()) if n else float("nan"),
        correct=correct,
        images=n,
        per_class=per_class,
        confusion=confusion,
    )


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: the chance, if both classifiers were equally accurate, of a split
    of the images exactly one of them gets right at least this uneven (binomial, p = 1/2)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"counts must be >= 0 (got {only_a}, {only_b})")
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def compare_correct(right: np.ndarray, other_right: np.ndarray) -> dict[str, Any]:
    """Image-by-image comparison of two classifiers on the same images (boolean arrays of who is right)."""
    only_this, only_other = int((right & ~other_right).sum()), int((~right & other_right).sum())
    return {
        "images": len(right),
        "both_right": int((right & other_right).sum()),
        "both_wrong": int((~right & ~other_right).sum()),
        "only_this_right": only_this,
        "only_other_right": only_other,
        "mcnemar_exact_p": mcnemar_exact_p(only_this, only_other),
    }


def jpeg_twins(test: LabelledImages, prefix: CanonicalPrefix, n: int) -> list[int] | None:
    """Indices into `test` of the JPEG copies of the first `n` lossless prefix images, when the
    test set is the YoongiKim JPEG tree (test/<class>/<rank>.jpg) and holds all of them."""
    by_class: dict[str, list[tuple[str, int]]] = {}
    for i, (label, key) in enumerate(zip(test.labels, test.keys, strict=True)):
        if key.rsplit("/", 1)[-1].lower().endswith((".jpg", ".jpeg")):
            by_class.setdefault(label, []).append((key.rsplit("/", 1)[-1], i))
    for files in by_class.values():
        files.sort()
    twins = []
    for label, rank in jpeg_keys_for_prefix(prefix)[:n]:
        files = by_class.get(label, [])
        if rank >= len(files) or files[rank][0].rsplit(".", 1)[0] != f"{rank:04d}":
            return None
        twins.append(files[rank][1])
    return twins


def evaluate(
    model: ServedModel,
    test: LabelledImages,
    prefix: CanonicalPrefix | None,
    limit: int,
    batch_size: int,
    latency_runs: int,
    other: ServedModel | None = None,
) -> dict[str, Any]:
    """Scores on the test set (and the lossless prefix, and its JPEG twins), plus batch-32 latency;
    with `other`, which test images each of the two gets right, and McNemar's exact test."""
    labels = list(model.require_config().labels or [])
    if not labels:
        raise EvaluationError(f"{model.key} has no labels in config.json")
    results: dict[str, Any] = {"labels": labels, "sets": {}}

    full = test
    test = test.head(limit)
    log.info("%s: %d images from %s", test.name, len(test), test.source)
    logits = predict_logits(model, test.images, batch_size)
    true = label_indices(test.labels, labels)
    s = score(logits, true, labels)
    log.info("%s: top-1 %.2f %% (%d/%d)", test.name, 100 * s.top1, s.correct, s.images)
    results["sets"]["test"] = {"name": test.name, "source": test.source, **s.to_dict()}
    if other is not None:
        other_labels = list(other.require_config().labels or [])
        if not other_labels:
            raise EvaluationError(f"{other.key} has no labels in config.json")
        other_pred = np.argmax(predict_logits(other, test.images, batch_size), axis=1)
        right = np.argmax(logits, axis=1) == true
        other_right = other_pred == label_indices(test.labels, other_labels)  # each model's own label order
        cmp = {
            "other": other.key,
            "model": model_facts(other),  # which artifact it was compared with
            "other_top1": float(other_right.mean()),
            **compare_correct(right, other_right),
        }
        results["comparison"] = cmp
        log.info(
            "against %s (top-1 %.2f %%): only this right %d, only the other %d, McNemar exact p = %.3g",
            other.key,
            100 * cmp["other_top1"],
            cmp["only_this_right"],
            cmp["only_other_right"],
            cmp["mcnemar_exact_p"],
        )

    if prefix is not None:
        lossless = prefix.images.head(limit)
        p_logits = predict_logits(model, lossless.images, batch_size)
        ps = score(p_logits, label_indices(lossless.labels, labels), labels)
        log.info("%s: top-1 %.2f %% (%d/%d)", lossless.name, 100 * ps.top1, ps.correct, ps.images)
        results["sets"]["lossless_prefix"] = {"name": lossless.name, "source": lossless.source, **ps.to_dict()}
        twins = jpeg_twins(full, prefix, len(lossless))
        if twins is not None:
            pairing = float(
                np.mean(
                    [
                        psnr(full.images[t].pixels, im.pixels, peak=255.0)
                        for t, im in zip(twins, lossless.images, strict=True)
                    ]
                )
            )
            if pairing >= MIN_PAIRING_PSNR:
                # Same images, JPEG vs lossless: the accuracy the JPEG compression costs.
                twin_images = [full.images[t] for t in twins]
                ts = score(
                    predict_logits(model, twin_images, batch_size),
                    label_indices([full.labels[t] for t in twins], labels),
                    labels,
                )
                results["sets"]["jpeg_twins_of_prefix"] = {
                    "name": "the same images as JPEG",
                    "source": test.source,
                    "pairing_psnr_db": pairing,
                    **ts.to_dict(),
                }
                log.info("same images as JPEG: top-1 %.2f %% (pairing PSNR %.1f dB)", 100 * ts.top1, pairing)
            else:
                log.warning("JPEG twins of the lossless prefix do not match (mean PSNR %.1f dB); skipped", pairing)

    task = task_of(model, ClassificationTask)
    sample = [full.images[i % len(full.images)] for i in range(LATENCY_BATCH)]
    batch = np.concatenate([task.tensor(im) for im in sample])
    inputs = {task.input: batch}
    timing = time_calls(lambda: model.predict(inputs, [LOGITS_OUTPUT]), latency_runs)
    results["latency"] = {"batch": LATENCY_BATCH, "input_hw": list(batch.shape[2:]), **timing}
    log.info("latency, batch %d at %s: median %.2f ms", LATENCY_BATCH, list(batch.shape[2:]), timing["median_ms"])
    return results
