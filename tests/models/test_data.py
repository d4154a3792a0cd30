"""CIFAR-10 loaders (canonical batches, zip, folder), the restricted unpickler, the cache and
the denoiser patch sampler, all on tiny synthetic data."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normserve.models import data as data_module
from normserve.models.data import (
    CIFAR_META,
    CIFAR_TEST_BATCH,
    CIFAR_TRAIN_BATCHES,
    NoisyPatchSampler,
    add_eval_noise,
    augment_crop_flip,
    cutout,
    iterate_batches,
    load_cifar10,
    restricted_load,
    to_tensor_nchw,
)
from normserve.quality import psnr

CLASSES = ["cat", "dog", "ship"]  # deliberately not CIFAR's ten: names must come from the data
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "ship": (30, 30, 200)}


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_zip(path: Path, per_class: int = 2) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for split in ("train", "test"):
            for cls in CLASSES:
                for i in range(per_class):
                    zf.writestr(f"{split}/{cls}/{i:04d}.jpg", _jpeg(COLOURS[cls]))
    return path


def make_folder(root: Path, per_class: int = 2) -> Path:
    for split in ("train", "test"):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                (root / split / cls / f"{i:04d}.jpg").write_bytes(_jpeg(COLOURS[cls]))
    return root


def make_canonical(root: Path, per_batch: int = 4, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """Python-2 style batches: bytes keys, (N, 3072) uint8 R,G,B planes, a list of int labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    all_data, all_labels = [], []
    for name in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * per_batch}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
        all_data.append(data)
        all_labels.append(labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    (root / CIFAR_META).write_bytes(pickle.dumps(meta, protocol=2))
    return root, np.concatenate(all_data), np.concatenate(all_labels)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_callables() -> None:
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        restricted_load(pickle.dumps(_Evil()))


def test_restricted_unpickler_loads_numpy_and_containers() -> None:
    obj = {"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": [1, 2.5, "x", b"y"], "c": (True, None)}
    got = restricted_load(pickle.dumps(obj, protocol=2))
    np.testing.assert_array_equal(got["a"], obj["a"])
    assert got["b"] == obj["b"] and got["c"] == obj["c"]


def test_canonical_batches(tmp_path: Path) -> None:
    root, data, labels = make_canonical(tmp_path / "cifar-10-batches-py")
    d = load_cifar10(root, cache_dir=None)
    n_train = 5 * 4
    assert d.train.images.shape == (n_train, 32, 32, 3) and d.test.images.shape == (4, 32, 32, 3)
    assert d.train.images.dtype == np.uint8
    assert d.label_names[0] == "airplane" and len(d.label_names) == 10
    np.testing.assert_array_equal(d.train.labels, labels[:n_train])
    np.testing.assert_array_equal(d.test.labels, labels[n_train:])
    # Row layout is R plane, G plane, B plane; the loader returns HWC.
    first = data[0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(d.train.images[0], first)


@pytest.mark.parametrize("layout", ["zip", "folder"])
def test_jpeg_layouts(tmp_path: Path, layout: str) -> None:
    src = make_zip(tmp_path / "c.zip") if layout == "zip" else make_folder(tmp_path / "c")
    d = load_cifar10(src, cache_dir=None)
    assert d.label_names == sorted(CLASSES)
    assert d.train.images.shape == (6, 32, 32, 3) and d.test.images.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(d.train.labels, [0, 0, 1, 1, 2, 2])
    for img, label in zip(d.train.images, d.train.labels, strict=True):
        colour = np.asarray(COLOURS[d.label_names[label]])
        assert np.abs(img.reshape(-1, 3).mean(0) - colour).max() < 4  # JPEG is lossy


def test_cache_roundtrip_and_invalidation(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "c.zip")
    cache = tmp_path / "cache"
    first = load_cifar10(src, cache_dir=cache)
    files = list(cache.glob("cifar10-*.npz"))
    assert len(files) == 1
    again = load_cifar10(src, cache_dir=cache)
    np.testing.assert_array_equal(first.train.images, again.train.images)
    assert again.label_names == first.label_names
    # A changed source gets a new cache entry instead of stale arrays.
    make_zip(src, per_class=3)
    changed = load_cifar10(src, cache_dir=cache)
    assert len(changed.train) == 9 and len(list(cache.glob("cifar10-*.npz"))) == 2


def test_cache_is_keyed_by_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bytes with a new mtime, or at another path (a re-mounted or copied data set),
    load from the cache without being decoded again."""
    src = make_zip(tmp_path / "c.zip")
    cache = tmp_path / "cache"
    first = load_cifar10(src, cache_dir=cache)
    copy = tmp_path / "elsewhere" / "copy.zip"
    copy.parent.mkdir()
    shutil.copyfile(src, copy)
    os.utime(src, ns=(1, 1))

    def no_decoding(path: Path) -> None:
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setitem(data_module._READERS, "zip", no_decoding)
    for source in (src, copy):
        again = load_cifar10(source, cache_dir=cache)
        np.testing.assert_array_equal(first.train.images, again.train.images)
    assert len(list(cache.glob("cifar10-*.npz"))) == 1


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_cifar10(tmp_path / "missing", cache_dir=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected"):
        load_cifar10(tmp_path / "empty", cache_dir=None)


def test_batches_and_augmentation() -> None:
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(10)
    plain = list(iterate_batches(images, labels, 4))
    assert [len(y) for _, y in plain] == [4, 4, 2]
    assert plain[0][0].dtype == torch.float32 and float(plain[0][0].max()) <= 1.0
    gen = torch.Generator().manual_seed(0)
    shuffled = list(iterate_batches(images, labels, 4, gen, augment_pad=2, drop_last=True))
    assert [len(y) for _, y in shuffled] == [4, 4]
    assert augment_crop_flip(images, 0, torch.Generator().manual_seed(0)).shape == images.shape
    nhwc = np.zeros((2, 5, 6, 3), dtype=np.uint8)
    assert to_tensor_nchw(nhwc).shape == (2, 3, 5, 6)


@pytest.mark.parametrize("size", [1, 4, 8])
def test_cutout_zeroes_one_square_per_image_clipped_at_the_border(size: int) -> None:
    images = torch.full((64, 3, 16, 16), 7, dtype=torch.uint8)
    out = cutout(images.clone(), size, torch.Generator().manual_seed(0))
    zeroed = out == 0
    assert torch.equal(zeroed[:, 0], zeroed[:, 1]) and torch.equal(zeroed[:, 0], zeroed[:, 2])  # all channels
    assert bool((out[~zeroed] == 7).all())  # nothing else changes
    for mask in zeroed[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert 1 <= len(rows) <= size and 1 <= len(cols) <= size  # a (clipped) square, never empty
        assert int(mask.sum()) == len(rows) * len(cols)  # a full rectangle
        assert rows.tolist() == list(range(int(rows[0]), int(rows[-1]) + 1))
    # Some squares are clipped by the border, some are whole.
    areas = zeroed[:, 0].sum((1, 2))
    assert int(areas.max()) == size * size and (size == 1 or int(areas.min()) < size * size)


def test_cutout_only_when_augmenting() -> None:
    images = torch.full((8, 3, 16, 16), 9, dtype=torch.uint8)
    labels = torch.arange(8)
    ((plain, _),) = iterate_batches(images, labels, 8, cutout_size=8)  # no generator: evaluation batches
    assert bool((plain > 0).all())
    ((cut, _),) = iterate_batches(images, labels, 8, torch.Generator().manual_seed(0), cutout_size=8)
    assert bool((cut == 0).any(dim=(1, 2, 3)).all())
    assert bool((images == 9).all())  # the source array is never modified


def test_noisy_patch_sampler() -> None:
    images = [
        torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8),
        torch.randint(0, 256, (3, 30, 20), dtype=torch.uint8),
    ]
    sampler = NoisyPatchSampler(images, patch_size=16, sigma_max=55.0)
    noisy, clean = sampler.batch(8, torch.Generator().manual_seed(1))
    assert noisy.shape == clean.shape == (8, 3, 16, 16)
    assert float(clean.min()) >= 0.0 and float(clean.max()) <= 1.0
    assert float((noisy - clean).std()) > 0.01
    again, _ = sampler.batch(8, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)  # deterministic for a seed
    no_noise = NoisyPatchSampler(images, patch_size=16, sigma_max=0.0)
    n0, c0 = no_noise.batch(4, torch.Generator().manual_seed(2))
    assert torch.equal(n0, c0)
    with pytest.raises(ValueError, match="smaller"):
        NoisyPatchSampler(images, patch_size=25)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_noisy_patch_sampler_clips_and_rounds_a_fraction_of_patches_like_a_png(fraction: float) -> None:
    images = [torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)]
    plain, clean = NoisyPatchSampler(images, 16, 55.0).batch(64, torch.Generator().manual_seed(3))
    noisy, clean2 = NoisyPatchSampler(images, 16, 55.0, fraction).batch(64, torch.Generator().manual_seed(3))
    assert torch.equal(clean, clean2)  # same crops and noise; only the clipping differs
    as_png = (noisy == plain.clamp(0, 1).mul(255).round().div(255)).flatten(1).all(1)
    unclipped = (noisy == plain).flatten(1).all(1)
    assert bool((as_png | unclipped).all())  # each patch is one or the other, whole
    clipped = int((as_png & ~unclipped).sum())  # float noise is never on the 8-bit grid and inside [0, 1]
    assert {0.0: clipped == 0, 0.5: 16 <= clipped <= 48, 1.0: clipped == 64}[fraction], clipped
    with pytest.raises(ValueError, match="clip_fraction"):
        NoisyPatchSampler(images, 16, clip_fraction=1.5)


def test_clip_fraction_zero_draws_nothing_so_older_runs_keep_their_batches() -> None:
    """Without clipping, a batch consumes exactly what it did before the option existed: the crops,
    then one sigma per patch, then the noise."""
    images = [torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)]
    sampler = NoisyPatchSampler(images, 16, 30.0, clip_fraction=0.0)
    g, ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(3):
        noisy, _ = sampler.batch(8, g)
        clean = sampler.clean_batch(8, ref)
        sigma = torch.rand(8, 1, 1, 1, generator=ref) * (30.0 / 255.0)
        assert torch.equal(noisy, clean + torch.randn(clean.shape, generator=ref) * sigma)
    assert torch.equal(g.get_state(), ref.get_state())


def test_eval_noise_and_psnr() -> None:
    clean = np.full((64, 64, 3), 0.5, dtype=np.float32)
    noisy = add_eval_noise(clean, 25.0, np.random.default_rng(0))
    assert abs(float((noisy - clean).std()) - 25 / 255) < 0.005
    assert abs(psnr(noisy, clean) - 20 * np.log10(255 / 25)) < 0.3
    assert psnr(clean, clean) == float("inf")
