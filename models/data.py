"""Training data: CIFAR-10 (canonical python batches, or a folder/zip of JPEGs) and denoiser patches.

CIFAR-10 is decoded once into uint8 arrays (N, 32, 32, 3) plus labels and class names, and cached
as an .npz keyed by the source's size and mtime, so later runs start in a second instead of
re-decoding 60,000 JPEGs. The canonical batches are pickles; they are read with a restricted
unpickler that can only rebuild builtins containers and numpy arrays, never call anything else,
so a user-supplied file cannot run code.

Denoiser training samples are random patches of clean images with random flips/rotations and
blind additive Gaussian noise, sigma ~ U[0, sigma_max] on the 0-255 scale. The noise is not
clipped to [0, 1]: that matches the standard CBSD68 evaluation protocol (float images, unclipped
noise), which is what the reported PSNR measures.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from normserve.files import IMAGE_SUFFIXES, sha256_file
from normserve.safe_pickle import restricted_load

log = logging.getLogger(__name__)

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_META = "batches.meta"
CIFAR_SIDE = 32
CACHE_VERSION = 2  # bump when the cached arrays change (2: .webp/.tif/.tiff images are decoded too)


def _get(d: dict[Any, Any], key: str) -> Any:
    """CIFAR pickles written by Python 2 have bytes keys; ones rewritten by Python 3 have str keys."""
    if key in d:
        return d[key]
    if key.encode() in d:
        return d[key.encode()]
    raise ValueError(f"CIFAR batch lacks {key!r} (keys: {sorted(map(str, d))})")


def _as_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- CIFAR-10 arrays


@dataclass
class ImageSet:
    """uint8 images (N, H, W, 3) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Cifar10Data:
    train: ImageSet
    test: ImageSet
    label_names: list[str]


def _read_canonical(folder: Path) -> Cifar10Data:
    def batch(name: str) -> ImageSet:
        d = restricted_load((folder / name).read_bytes())
        data = np.asarray(_get(d, "data"), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIDE * CIFAR_SIDE:
            raise ValueError(f"{folder / name}: expected (N, 3072) data, got {data.shape}")
        images = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)  # R,G,B planes -> HWC
        labels = np.asarray(_get(d, "labels"), dtype=np.int64)
        if len(labels) != len(images):
            raise ValueError(f"{folder / name}: {len(images)} images but {len(labels)} labels")
        return ImageSet(np.ascontiguousarray(images), labels)

    parts = [batch(n) for n in CIFAR_TRAIN_BATCHES]
    train = ImageSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    meta = restricted_load((folder / CIFAR_META).read_bytes())
    names = [_as_str(n) for n in _get(meta, "label_names")]
    return Cifar10Data(train, batch(CIFAR_TEST_BATCH), names)


def _decode_rgb(data: bytes) -> np.ndarray:
    """RGB uint8 (32, 32, 3). An image of another size is resized to 32x32 the way `/classify`
    resizes an upload (bilinear; Pillow antialiases when shrinking), so a folder of one's own
    photos trains on what the served model will see."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
        if rgb.size != (CIFAR_SIDE, CIFAR_SIDE):
            rgb = rgb.resize((CIFAR_SIDE, CIFAR_SIDE), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def _split_entries(names: list[str]) -> dict[str, dict[str, list[str]]]:
    """{split: {class: [entry, ...]}} from `split/class/file` paths (any leading folder allowed)."""
    out: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            continue
        split, cls = parts[-3], parts[-2]
        if split in out:
            out[split].setdefault(cls, []).append(name)
    return out


def _read_image_tree(entries: dict[str, dict[str, list[str]]], read: Any, source: Path) -> Cifar10Data:
    classes = sorted(entries["train"])
    if not classes:
        raise ValueError(f"{source}: no train/<class>/*.jpg images found")
    if not entries["test"]:
        raise ValueError(f"{source}: no test/<class>/ images; put a few images of each class aside under test/<class>/")
    if sorted(entries["test"]) != classes:
        raise ValueError(f"{source}: train classes {classes} differ from test classes {sorted(entries['test'])}")

    def split(name: str) -> ImageSet:
        images, labels = [], []
        for idx, cls in enumerate(classes):
            for entry in sorted(entries[name][cls]):  # sorted file names keep the source's order
                try:
                    images.append(_decode_rgb(read(entry)))
                except (OSError, ValueError) as exc:  # Pillow's errors name no file
                    raise ValueError(f"{source}: {entry} is not a readable image ({exc})") from None
                labels.append(idx)
        return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64))

    return Cifar10Data(split("train"), split("test"), classes)


def _read_zip(path: Path) -> Cifar10Data:
    with zipfile.ZipFile(path) as zf:
        entries = _split_entries([i.filename for i in zf.infolist() if not i.is_dir()])
        return _read_image_tree(entries, zf.read, path)


def _read_folder(folder: Path) -> Cifar10Data:
    names = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file()]
    return _read_image_tree(_split_entries(names), lambda n: (folder / n).read_bytes(), folder)


def _source_files(path: Path) -> tuple[str, list[Path]]:
    """The layout of `path` and the files whose contents key its cache."""
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a zip; expected a zip or folder of train/<class>/*.jpg")
        return "zip", [path]
    if not path.is_dir():
        raise ValueError(f"CIFAR-10 data not found at {path}")
    if (path / CIFAR_TEST_BATCH).is_file():
        return "canonical", [path / n for n in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH, CIFAR_META)]
    if (path / "train").is_dir():  # test/ is checked when it is read, with a message of its own
        return "folder", sorted(p for p in path.rglob("*") if p.is_file())
    raise ValueError(
        f"{path}: expected train/<class>/ and test/<class>/ folders of images, or CIFAR-10's python batches "
        f"({CIFAR_TEST_BATCH}, ...)"
    )


_READERS = {"canonical": _read_canonical, "zip": _read_zip, "folder": _read_folder}


def cache_key(path: Path) -> str:
    """Hash of the source's layout and every source file's name and contents.

    Contents, not size and mtime: a data set that is copied, re-mounted or unpacked again (a new
    mtime, the same bytes) keeps its cache instead of being decoded again and cached twice.
    Hashing the 62 MB zip takes about 0.1 s; decoding it takes about a minute.
    """
    layout, files = _source_files(path)
    h = hashlib.sha256(f"v{CACHE_VERSION}|{layout}".encode())
    for f in files:
        h.update(
            f"|{f.relative_to(path) if f != path else ''}:{sha256_file(f)}".encode()
        )  # a zip's own name is not content
    return h.hexdigest()[:20]


def load_cifar10(path: str | Path, cache_dir: str | Path | None = ".cache") -> Cifar10Data:
    """CIFAR-10 from canonical python batches, a zip, or a folder; decoded once and cached.

    `cache_dir=None` disables the cache.
    """
    path = Path(path)
    layout, _ = _source_files(path)
    cache = Path(cache_dir) / f"cifar10-{cache_key(path)}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return Cifar10Data(
                ImageSet(z["train_images"], z["train_labels"]),
                ImageSet(z["test_images"], z["test_labels"]),
                [str(n) for n in z["label_names"]],
            )
    log.info("decoding CIFAR-10 (%s layout) from %s", layout, path)
    data = _READERS[layout](path)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own per process: two runs decoding at once must not rename each other's file.
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            train_images=data.train.images,
            train_labels=data.train.labels,
            test_images=data.test.images,
            test_labels=data.test.labels,
            label_names=np.asarray(data.label_names),
        )
        tmp.replace(cache)  # atomic: a killed run never leaves a half-written cache behind
    return data


def to_tensor_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 tensor (N, C, H, W); converted to float per batch to save memory."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def augment_crop_flip(batch: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop with `pad` zero padding, then random horizontal flip (standard CIFAR augmentation)."""
    n, _, h, w = batch.shape
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    flip = (torch.rand(n, generator=generator) < 0.5).tolist()
    out = torch.empty_like(batch)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def cutout(batch: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one `size` x `size` square per image, centred anywhere (clipped at the border), as in
    DeVries & Taylor 2017, "Improved Regularization of CNNs with Cutout". Works in place."""
    n, _, h, w = batch.shape
    cy = torch.randint(0, h, (n,), generator=generator).tolist()
    cx = torch.randint(0, w, (n,), generator=generator).tolist()
    half = size // 2
    for i in range(n):
        y0, x0 = max(0, cy[i] - half), max(0, cx[i] - half)
        batch[i, :, y0 : cy[i] - half + size, x0 : cx[i] - half + size] = 0
    return batch


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    augment_pad: int = 0,
    drop_last: bool = False,
    cutout_size: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Float [0, 1] image batches and labels; shuffled and augmented when a generator is given
    (pad-crop and flip when `augment_pad` > 0, then cutout when `cutout_size` > 0)."""
    n = len(labels)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = images[idx]
        if generator is not None and augment_pad > 0:
            x = augment_crop_flip(x, augment_pad, generator)
        if generator is not None and cutout_size > 0:
            x = cutout(x, cutout_size, generator)  # x is a fresh copy (advanced indexing)
        yield x.float().div_(255.0), labels[idx]


# --------------------------------------------------------------------------- denoiser data


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def load_rgb(path: str | Path) -> np.ndarray:
    """uint8 (H, W, 3)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image_folder(folder: str | Path) -> list[torch.Tensor]:
    """Every image of `folder` as a uint8 (3, H, W) tensor (the whole CBSD432 set is ~200 MB)."""
    return [torch.from_numpy(load_rgb(p).copy()).permute(2, 0, 1).contiguous() for p in list_images(folder)]


class NoisyPatchSampler:
    """Batches of (noisy, clean) float patches: random image, crop, one of 8 flips/rotations,
    blind Gaussian noise with sigma ~ U[0, sigma_max] / 255 per patch. A `clip_fraction` of the
    patches (each drawn independently) is then clipped to [0, 1] and rounded to 8 bits, as an
    image a client sends as a PNG; the rest keep the unclipped float noise (the papers' protocol)."""

    def __init__(
        self, images: list[torch.Tensor], patch_size: int, sigma_max: float = 55.0, clip_fraction: float = 0.0
    ) -> None:
        if patch_size < 4:
            raise ValueError(f"patch_size must be >= 4, got {patch_size}")
        small = [tuple(im.shape[1:]) for im in images if min(im.shape[1:]) < patch_size]
        if small:
            raise ValueError(f"images smaller than patch_size={patch_size} (--patch-size): {small[:3]}")
        if sigma_max < 0:
            raise ValueError(f"sigma_max must be >= 0, got {sigma_max}")
        if not 0.0 <= clip_fraction <= 1.0:
            raise ValueError(f"clip_fraction must be in [0, 1], got {clip_fraction}")
        self.images = images
        self.patch_size = patch_size
        self.sigma_max = sigma_max
        self.clip_fraction = clip_fraction

    def clean_batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        p = self.patch_size
        idx = torch.randint(0, len(self.images), (batch_size,), generator=generator).tolist()
        rnd = torch.rand(batch_size, 2, generator=generator).tolist()
        ops = torch.randint(0, 8, (batch_size,), generator=generator).tolist()
        out = torch.empty(batch_size, self.images[0].shape[0], p, p, dtype=torch.uint8)
        for i, (k, (ry, rx), op) in enumerate(zip(idx, rnd, ops, strict=True)):
            im = self.images[k]
            y0 = int(ry * (im.shape[1] - p + 1))
            x0 = int(rx * (im.shape[2] - p + 1))
            crop = im[:, y0 : y0 + p, x0 : x0 + p]
            if op & 4:
                crop = crop.flip(-1)
            out[i] = torch.rot90(crop, op & 3, dims=(1, 2))  # 4 rotations x optional flip = 8 dihedral ops
        return out.float().div_(255.0)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        clean = self.clean_batch(batch_size, generator)
        sigma = torch.rand(batch_size, 1, 1, 1, generator=generator) * (self.sigma_max / 255.0)
        noise = torch.randn(clean.shape, generator=generator) * sigma
        noisy = clean + noise
        if self.clip_fraction > 0:  # no extra draw otherwise: unclipped runs keep their batches
            as_png = torch.rand(batch_size, 1, 1, 1, generator=generator) < self.clip_fraction
            noisy = torch.where(as_png, noisy.clamp(0.0, 1.0).mul(255.0).round().div(255.0), noisy)
        return noisy, clean


def add_eval_noise(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The float evaluation protocol: clean in [0, 1] plus N(0, sigma/255), not clipped."""
    return (clean + rng.normal(0.0, sigma / 255.0, clean.shape)).astype(np.float32)
