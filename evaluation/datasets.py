"""Evaluation data, decoded the way the service decodes uploads (`service.imaging.decode_image`).

* CIFAR-10 test split from a zip or folder of `test/<class>/*.jpg` (any leading folder), or from
  the canonical python batches (`test_batch` + `batches.meta`, read with a restricted unpickler
  that can rebuild only builtins containers and numpy arrays).
* The lossless canonical test prefix in `cifar10_canonical_labels_and_test_prefix.npz`
  (`test_prefix_data` rows are R, G, B planes; `test_prefix_labels` index `label_names`).
* A folder of clean test images (CBSD68) for the denoiser.

Labels stay class *names* here; the caller maps them to the model's label indices by name.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normserve.evaluation.runtime import EvaluationError
from normserve.files import IMAGE_SUFFIXES
from normserve.safe_pickle import restricted_load
from normserve.service.errors import NormserveError
from normserve.service.imaging import DecodedImage, decode_image
from normserve.service.settings import Settings

CIFAR_SIDE = 32


@dataclass
class LabelledImages:
    """Decoded RGB images with their class names, in evaluation order."""

    name: str  # what the set is, for reports
    source: str  # where it was read from
    images: list[DecodedImage]
    labels: list[str]  # class name of each image
    keys: list[str]  # where each image came from ("test/cat/0001.jpg", "test_batch[17]", ...)

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> LabelledImages:
        """The first `n` images (all when n is 0)."""
        if n <= 0 or n >= len(self):
            return self
        return LabelledImages(self.name, self.source, self.images[:n], self.labels[:n], self.keys[:n])


def _decode(data: bytes, where: str) -> DecodedImage:
    """Decode as the service decodes an upload (same pixel limit); name the file on failure."""
    try:
        return decode_image(data, Settings.model_fields["max_image_pixels"].default)
    except NormserveError as exc:
        raise EvaluationError(f"{where}: {exc.message}") from None


# --------------------------------------------------------------------------- CIFAR-10 JPEG tree


def _test_entries(names: list[str]) -> list[tuple[str, str]]:
    """(class, entry) for every `.../test/<class>/<file>` image, ordered by (file name, class):
    the first N then cover every class (round robin), and each class keeps its file order."""
    found = []
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if len(parts) >= 3 and parts[-3] == "test" and parts[-1].lower().endswith(IMAGE_SUFFIXES):
            found.append((parts[-2], name))
    return sorted(found, key=lambda ce: (ce[1].replace("\\", "/").rsplit("/", 1)[-1], ce[0]))


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def tree_name(classes: set[str], entries: list[str], source: Path) -> str:
    """What a test/<class>/ tree is, for reports: CIFAR-10 only when it has CIFAR-10's classes;
    anything else is named by where it came from."""
    if classes == set(CIFAR10_CLASSES):
        jpeg = all(e.lower().endswith((".jpg", ".jpeg")) for e in entries)
        return "CIFAR-10 test, JPEG (about quality 75)" if jpeg else "CIFAR-10 test"
    return f"test/ of {source.name} ({len(classes)} classes)"


def _from_tree(entries: list[tuple[str, str]], read: Any, source: Path) -> LabelledImages:
    if not entries:
        raise EvaluationError(f"{source}: no test/<class>/*.jpg images found")
    images = [_decode(read(entry), f"{source}:{entry}") for _, entry in entries]
    labels = [c for c, _ in entries]
    name = tree_name(set(labels), [e for _, e in entries], source)
    return LabelledImages(name, str(source), images, labels, [e.replace("\\", "/") for _, e in entries])


# --------------------------------------------------------------------------- canonical batches


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        data = restricted_load(path.read_bytes())
    except (pickle.UnpicklingError, EOFError) as exc:
        raise EvaluationError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise EvaluationError(f"{path}: expected a dict, got {type(data).__name__}")
    return data


def _get(d: dict[Any, Any], key: str, path: Path) -> Any:
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise EvaluationError(f"{path} lacks {key!r}")


def _rows_to_images(rows: np.ndarray, fmt: str) -> list[DecodedImage]:
    """(N, 3072) uint8 rows of R, G, B planes -> 32x32 RGB images."""
    rows = np.asarray(rows, dtype=np.uint8)
    if rows.ndim != 2 or rows.shape[1] != 3 * CIFAR_SIDE * CIFAR_SIDE:
        raise EvaluationError(f"expected (N, 3072) CIFAR rows, got {rows.shape}")
    hwc = rows.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return [DecodedImage(np.ascontiguousarray(im), fmt) for im in hwc]


def _from_canonical(folder: Path) -> LabelledImages:
    batch = _unpickle(folder / "test_batch")
    names = [
        n.decode() if isinstance(n, bytes) else str(n)
        for n in _get(_unpickle(folder / "batches.meta"), "label_names", folder / "batches.meta")
    ]
    images = _rows_to_images(_get(batch, "data", folder / "test_batch"), "canonical")
    labels = [names[int(i)] for i in _get(batch, "labels", folder / "test_batch")]
    if len(labels) != len(images):
        raise EvaluationError(f"{folder / 'test_batch'}: {len(images)} images but {len(labels)} labels")
    return LabelledImages(
        "CIFAR-10 test (canonical)", str(folder), images, labels, [f"test_batch[{i}]" for i in range(len(images))]
    )


# --------------------------------------------------------------------------- entry points


def load_cifar10_test(path: Path) -> LabelledImages:
    """The test split from a zip or a folder holding test/<class>/ (CIFAR-10's or one's own
    classes), or CIFAR-10's canonical batches."""
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise EvaluationError(f"{path}: not a zip; expected a zip or folder of test/<class>/*.jpg")
        with zipfile.ZipFile(path) as zf:
            entries = _test_entries([i.filename for i in zf.infolist() if not i.is_dir()])
            return _from_tree(entries, zf.read, path)
    if not path.is_dir():
        raise EvaluationError(f"CIFAR-10 data not found at {path}")
    if (path / "test_batch").is_file():
        return _from_canonical(path)
    names = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    return _from_tree(_test_entries(names), lambda n: (path / n).read_bytes(), path)


@dataclass
class CanonicalPrefix:
    """The lossless first test images and what the .npz says about the whole test batch."""

    images: LabelledImages
    test_labels: list[str]  # class names of all canonical test images, in test_batch order


def load_canonical_prefix(path: Path) -> CanonicalPrefix:
    if not path.is_file():
        raise EvaluationError(f"canonical prefix {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        missing = {"test_prefix_data", "test_prefix_labels", "label_names", "labels_test_batch"} - set(z.files)
        if missing:
            raise EvaluationError(f"{path}: lacks {sorted(missing)}")
        names = [str(n) for n in z["label_names"]]
        images = _rows_to_images(z["test_prefix_data"], "npz")
        labels = [names[int(i)] for i in z["test_prefix_labels"]]
        test_labels = [names[int(i)] for i in z["labels_test_batch"]]
    if len(labels) != len(images):
        raise EvaluationError(f"{path}: {len(images)} images but {len(labels)} labels")
    keys = [f"test_batch[{i}]" for i in range(len(images))]
    return CanonicalPrefix(
        LabelledImages("CIFAR-10 test, lossless canonical prefix", str(path), images, labels, keys), test_labels
    )


def jpeg_keys_for_prefix(prefix: CanonicalPrefix) -> list[tuple[str, int]]:
    """(class, rank) of each prefix image: `test/<class>/<rank>.jpg` in the YoongiKim layout is the
    rank-th image of that class in test_batch order (data README)."""
    seen: dict[str, int] = {}
    out = []
    for label in prefix.test_labels[: len(prefix.images)]:
        out.append((label, seen.get(label, 0)))
        seen[label] = seen.get(label, 0) + 1
    return out


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise EvaluationError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EvaluationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def read_image(path: Path) -> DecodedImage:
    """One image file, decoded exactly as an upload to the service would be."""
    return _decode(path.read_bytes(), str(path))
