"""`normserve eval classifier|denoiser` / `python -m normserve.evaluation`: evaluate a model repository
version through ONNX Runtime and write `<task>.json`, `<task>.md` and a PNG into --out.

normserve eval classifier --repository model_repository --threads 2
normserve eval denoiser --baselines --publish docs/eval
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from normserve.evaluation import classifier as cls_eval
from normserve.evaluation import denoiser as den_eval
from normserve.evaluation.args import DEFAULT_CIFAR_NPZ, add_arguments
from normserve.evaluation.baselines import Baseline, load_baselines
from normserve.evaluation.datasets import list_images, load_canonical_prefix, load_cifar10_test
from normserve.evaluation.report import (
    classifier_markdown,
    denoiser_markdown,
    environment,
    publish,
    update_config,
    write_json,
)
from normserve.evaluation.runtime import EvaluationError, model_facts, open_served_model
from normserve.service.model import ServedModel

log = logging.getLogger("normserve.eval")

# What each task imports from the eval extra: the classifier only plots its confusion matrix.
REQUIRED = {
    "classifier": {"matplotlib": "matplotlib"},
    "denoiser": {"skimage": "scikit-image", "matplotlib": "matplotlib", "scipy": "scipy"},
}


def _require_extra(task: str) -> None:
    missing = [pkg for mod, pkg in REQUIRED[task].items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise EvaluationError(f"normserve eval {task} needs {missing}: pip install -e '.[eval]'")


def _out_dir(args: argparse.Namespace, model: ServedModel) -> Path:
    return args.out or Path("runs") / "eval" / f"{model.name}-v{model.version}"


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keep = ("repository", "threads", "providers", "limit", "latency_runs", "data")
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in keep}


def _envelope(args: argparse.Namespace, model: ServedModel, command: str, started: float) -> dict[str, Any]:
    return {
        "task": args.task,
        "model": model_facts(model),
        "settings": _settings(args),
        "command": command,
        "evaluated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "environment": environment(),
    }


def _finish(
    args: argparse.Namespace,
    model: ServedModel,
    data: dict[str, Any],
    markdown: str,
    pngs: list[Path],
    headline: tuple[str, dict[str, Any]],
) -> None:
    out = _out_dir(args, model)
    files = [write_json(out / f"{args.task}.json", data), *pngs]
    md = out / f"{args.task}.md"
    md.write_text(markdown)
    files.append(md)
    for f in files:
        print(f)
    if args.publish:
        for f in publish(files, args.publish):
            print(f)
    if args.update_config:
        key, metrics = headline
        print(update_config(model, key, metrics))
    print(markdown)


def _open_model(
    args: argparse.Namespace, task: str, noun: str, repository: Path | None = None, version: str | None = None
) -> ServedModel:
    """The repository version to evaluate (or another one), loaded the way the service loads it;
    refused if it does another task."""
    model, _ = open_served_model(
        repository or args.repository, args.model, version or args.version, args.threads, args.providers
    )
    if model.require_config().task != task:
        raise EvaluationError(f"{model.key} is a {model.require_config().task} model, not {noun}")
    return model


def _open_other(args: argparse.Namespace, task: str, noun: str) -> ServedModel | None:
    """--compare's version, opened (and checked) before any data is read."""
    if args.compare is not None:
        return _open_model(args, task, noun, args.compare_repository, args.compare)
    if args.compare_repository is not None:
        raise EvaluationError("--compare-repository needs --compare VERSION")
    return None


def run_classifier(args: argparse.Namespace, command: str) -> int:
    started = time.perf_counter()
    model = _open_model(args, "classification", "a classifier")
    other = _open_other(args, "classification", "a classifier")
    test = load_cifar10_test(args.data)
    cifar = test.name.startswith("CIFAR-10")  # CIFAR-10's classes, or one's own data
    # The lossless CIFAR-10 prefix is read by default only beside CIFAR-10 test data.
    default_npz = DEFAULT_CIFAR_NPZ if cifar and DEFAULT_CIFAR_NPZ.is_file() else None
    npz = None if args.no_npz else args.npz or default_npz
    if npz is None and cifar and not args.no_npz:
        log.warning("no lossless canonical prefix (%s not found); pass --npz", DEFAULT_CIFAR_NPZ)
    prefix = load_canonical_prefix(npz) if npz is not None else None
    results = cls_eval.evaluate(model, test, prefix, args.limit, args.batch_size, args.latency_runs, other)

    data = _envelope(args, model, command, started)
    data["settings"] |= {"npz": str(npz) if npz else None, "batch_size": args.batch_size}
    data["results"] = results
    out = _out_dir(args, model)
    out.mkdir(parents=True, exist_ok=True)
    from normserve.evaluation.plots import confusion_png

    test_scores = results["sets"]["test"]
    png = confusion_png(
        out / "classifier_confusion.png",
        np.asarray(test_scores["confusion"]),
        results["labels"],
        f"{model.name} v{model.version}: {test.name}, top-1 {100 * test_scores['top1']:.2f} % "
        f"({test_scores['images']:,} images)",
    )
    key, stem = ("cifar10", "cifar10_") if cifar else ("test", "")  # the names say which data it was
    headline = {
        f"{stem}test_top1": test_scores["top1"],
        f"{stem}test_images": test_scores["images"],
        "data": str(args.data),
        "latency_ms_batch32": results["latency"]["median_ms"],
        "threads": args.threads,
        "provider": model.provider,
        "evaluated_at": data["evaluated_at"],
        "command": command,
    }
    if "lossless_prefix" in results["sets"]:
        headline["cifar10_lossless_prefix_top1"] = results["sets"]["lossless_prefix"]["top1"]
        headline["cifar10_lossless_prefix_images"] = results["sets"]["lossless_prefix"]["images"]
    data["headline"] = headline
    _finish(args, model, data, classifier_markdown(data), [png], (key, headline))
    return 0


def run_denoiser(args: argparse.Namespace, command: str) -> int:
    started = time.perf_counter()
    model = _open_model(args, "denoising", "a denoiser")
    other = _open_other(args, "denoising", "a denoiser")
    all_files = list_images(args.data)
    files = all_files[: args.limit] if args.limit else all_files
    baselines: list[Baseline] = []
    notes: list[str] = []
    if args.baselines:
        try:
            baselines, notes = load_baselines(args.baseline_methods, args.threads, args.bm3d_limit)
        except ValueError as exc:
            raise EvaluationError(str(exc)) from None
    records = den_eval.evaluate_images(model, files, args.sigmas, args.seed, baselines, args.baselines_limit, other)
    summary = den_eval.summarise(records)
    latency = den_eval.latency(model, files[0], args.seed, args.latency_runs, args.latency_size)
    log.info("latency %dx%d: median %.1f ms", args.latency_size, args.latency_size, latency["median_ms"])

    data = _envelope(args, model, command, started)
    data["settings"] |= {
        "sigmas": args.sigmas,
        "seed": args.seed,
        "data_name": args.data.name,
        "baselines": args.baselines,
        "baselines_limit": args.baselines_limit,
        "bm3d_limit": args.bm3d_limit,
        "baseline_methods": args.baseline_methods if args.baselines else [],
        "protocols": list(den_eval.PROTOCOLS),
    }
    results: dict[str, Any] = {"images": len(files), "summary": summary, "latency": latency}
    if args.baselines:
        results["baselines"] = {
            "methods": [b.name for b in baselines],
            "titles": {b.name: b.title for b in baselines},
            "params": {b.name: {f"{s:g}": b.params(s) for s in args.sigmas} for b in baselines},
            "notes": [*notes, *(f"{b.title}: {n}" for b in baselines for n in b.notes)],
        }
    if other is not None:
        results["comparison"] = den_eval.comparison(other, records)
    results["per_image"] = [r.__dict__ for r in records]
    data["results"] = results

    out = _out_dir(args, model)
    out.mkdir(parents=True, exist_ok=True)
    from normserve.evaluation.plots import grid_png

    grid_files = den_eval.pick_grid_files(files, args.grid_images)
    rows = den_eval.grid_rows(model, grid_files, args.grid_sigma, args.seed)
    png = grid_png(
        out / "denoiser_grid.png",
        rows,
        f"{model.name} v{model.version}, σ = {args.grid_sigma:g} (float protocol): noisy | denoised | clean\n"
        f"centre crops; PSNR of the whole image",
    )
    headline: dict[str, Any] = {"images": len(files), "seed": args.seed}
    for protocol in den_eval.PROTOCOLS:
        for metric in ("psnr", "ssim"):
            headline[f"{metric}_{protocol}"] = {k: v[den_eval.MODEL][metric] for k, v in summary[protocol].items()}
    headline |= {
        f"latency_ms_{args.latency_size}": latency["median_ms"],
        "threads": args.threads,
        "provider": model.provider,
        "evaluated_at": data["evaluated_at"],
        "command": command,
    }
    data["headline"] = headline
    _finish(args, model, data, denoiser_markdown(data), [png], ("cbsd68", headline))
    return 0


def run(args: argparse.Namespace, command: str | None = None) -> int:
    command = command if command is not None else shlex.join(sys.argv)
    logging.getLogger("normserve").setLevel(logging.INFO)
    try:
        _require_extra(args.task)
        if args.update_config and args.limit:
            raise EvaluationError("--update-config records metrics of the whole test set; drop --limit")
        runner = run_classifier if args.task == "classifier" else run_denoiser
        return runner(args, command)
    except (EvaluationError, ModuleNotFoundError) as exc:
        print(f"normserve eval: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m normserve.evaluation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    return run(parser.parse_args(argv), shlex.join(["python", "-m", "evaluation", *argv]))
