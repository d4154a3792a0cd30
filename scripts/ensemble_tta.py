"""CIFAR-10 test top-1 of trained classifier runs, alone and averaged, with each test-time
augmentation the export offers. Needs the export extra (torch).

    python -m scripts.ensemble_tta runs/cls_ws_e48 runs/cls_ws_cutout_e100

Each run is a folder `normserve train classifier` wrote (config.json + weights.safetensors). The
views are computed by the very module `normserve export --tta MODE` traces (`wrap_for_export`), in
PyTorch fp32, so a mode's column is what its exported fp32 graph would score. The ensemble is the
mean of the runs' logits, what `--teacher` distils from.
"""

from __future__ import annotations

import argparse

import torch

from normserve.export.args import TTA_MODES
from normserve.export.onnx_export import wrap_for_export
from normserve.models.data import iterate_batches, load_cifar10, to_tensor_nchw
from normserve.models.training.run_folder import load_run

DEFAULT_DATA = "../shared/data/cifar-10-jpeg/CIFAR-10-images.zip"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="trained run folders")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 source (as train --data)")
    p.add_argument("--cache-dir", default=".cache", help="decoded CIFAR arrays")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_cifar10(args.data, args.cache_dir or None)
    x, y = to_tensor_nchw(data.test.images), torch.from_numpy(data.test.labels).long()
    names = [*args.runs, "ensemble (mean logits)"] if len(args.runs) > 1 else args.runs
    print(f"| views | {' | '.join(names)} |\n|---|{'---:|' * len(names)}")
    models = [load_run(run)[1] for run in args.runs]
    for tta in TTA_MODES:
        logits = []
        for model in models:
            graph = wrap_for_export("gncnn", model, tta)
            with torch.inference_mode():
                logits.append(torch.cat([graph(xb)[0] for xb, _ in iterate_batches(x, y, 500)]))
        if len(logits) > 1:
            logits.append(torch.stack(logits).mean(0))
        accs = [float((lg.argmax(1) == y).float().mean()) for lg in logits]
        print(f"| {tta} | {' | '.join(f'{a:.2%}' for a in accs)} |", flush=True)


if __name__ == "__main__":
    main()
