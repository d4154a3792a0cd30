"""Hold a validation split out of a folder of clean training images (CBSD432), so that denoiser
candidates are chosen on images that neither train on nor belong to the test set (CBSD68).

    python -m scripts.denoise_holdout ../shared/data/denoise/train/CBSD432 /tmp/cbsd432-split
    normserve train denoiser --data /tmp/cbsd432-split/train --test-data /tmp/cbsd432-split/val ...

Writes OUT/train/ and OUT/val/ as symbolic links to the original files (nothing is copied): every
--every-th image in sorted file order goes to val/ (36 of CBSD432's 432 with the default 12), the
rest to train/. The split is a pure function of the file names, so it is the same on every machine.
`train`'s `--test-data` then reports the validation PSNR (its `psnr_sigma25` column).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from normserve.models.data import list_images


def split(source: Path, out: Path, every: int) -> tuple[int, int]:
    """Link every `every`-th image of `source` (sorted) into out/val, the others into out/train."""
    if every < 2:
        raise ValueError(f"--every must be >= 2, got {every}")
    files = list_images(source)
    counts = {"train": 0, "val": 0}
    for part in counts:
        folder = out / part
        folder.mkdir(parents=True, exist_ok=True)
        stale = [p for p in folder.iterdir() if p.is_symlink()]
        for p in stale:
            p.unlink()
    for i, path in enumerate(files):
        part = "val" if i % every == 0 else "train"
        (out / part / path.name).symlink_to(path.resolve())
        counts[part] += 1
    return counts["train"], counts["val"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.denoise_holdout", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="folder of clean training images")
    p.add_argument("out", type=Path, help="where train/ and val/ are written")
    p.add_argument("--every", type=int, default=12, help="every N-th image (sorted) is held out")
    args = p.parse_args(argv)
    try:
        n_train, n_val = split(args.source, args.out, args.every)
    except (OSError, ValueError) as exc:
        p.error(str(exc))
    print(f"{args.out}/train: {n_train} images, {args.out}/val: {n_val} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
