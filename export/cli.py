"""`normserve export` / `python -m normserve.export`: build models from config + weights, export, check, write.

normserve export                      # both shipped models -> model_repository/<name>/<next version>
normserve export --model gncnn --config my.json --weights my.safetensors --labels labels.txt
normserve export --model gncnn --random-init --seed 0      # untrained, marked so in config.json
normserve export --model gncnn --int8 ../shared/data/cifar-10-jpeg/CIFAR-10-images.zip   # int8 graph
normserve export --verify             # committed ONNX still matches the shipped weights?
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import onnx

from normserve.contract import CONFIG_FILE, MODEL_FILE, ModelConfigFile
from normserve.export.args import add_arguments
from normserve.export.onnx_export import check_graph, check_parity
from normserve.export.quantize import Int8Request, check_int8_weights, cifar_calibration_split
from normserve.export.repository import export_to_repository
from normserve.files import sha256_file
from normserve.models.registry import MODEL_KINDS, ModelSpec, build_model
from normserve.models.weights import (
    load_spec,
    read_weights_info,
    shipped_spec_path,
    shipped_weights_path,
)

log = logging.getLogger("normserve.export")


def read_labels(path: Path) -> list[str]:
    text = path.read_text()
    if path.suffix == ".json":
        labels = json.loads(text)
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"{path}: expected a JSON list of strings")
        return labels
    return [line.strip() for line in text.splitlines() if line.strip()]


class UserError(Exception):
    """A mistake in what the user asked for: one line on stderr, no traceback."""


def _config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a JSON object with 'kind' and 'config'")
    return data


def spec_and_labels(
    kind: str, config: Path | None, weights: Path | None, labels_file: Path | None
) -> tuple[ModelSpec, list[str] | None]:
    """The model spec and the labels to export `weights` with.

    The spec comes from --config, else from the weights file's own metadata (what `normserve
    train` records), else the shipped spec. Labels come from --labels, else the weights file, else
    the --config file's "labels" (a training run's config.json holds them): None leaves them to the
    exporter's check.
    """
    if weights is not None and not weights.is_file():
        raise UserError(f"--weights {weights}: no such file")
    try:
        info = read_weights_info(weights) if weights is not None else None
    except Exception as exc:  # safetensors' own error type: not a safetensors file
        raise UserError(f"--weights {weights}: not a safetensors weights file ({exc})") from None
    data = _config_file(config) if config is not None else None
    try:
        if data is not None:
            spec = ModelSpec.from_dict(data)
        elif info is not None and info.model is not None:
            spec = ModelSpec.from_dict(info.model)
        else:
            spec = load_spec(shipped_spec_path(kind))
    except (ValueError, TypeError) as exc:
        where = f"--config {config}" if config is not None else f"the model config recorded in {weights}"
        raise UserError(f"{where}: {exc}") from None
    if spec.kind != kind:
        source = f"--config {config}" if config is not None else str(weights)
        raise UserError(f"{source} is a {spec.kind!r} model, not {kind!r}: pass --model {spec.kind}")
    labels = None
    if labels_file is not None:
        try:
            labels = read_labels(labels_file)
        except (OSError, ValueError) as exc:
            raise UserError(f"--labels {labels_file}: {exc}") from None
    elif info is not None and info.labels is not None:
        labels = info.labels
    elif data is not None and isinstance(data.get("labels"), list):
        labels = [str(x) for x in data["labels"]]
    return spec, labels


def latest_version_dir(model_dir: Path) -> Path:
    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise FileNotFoundError(f"no version folders in {model_dir}")
    return versions[-1]


def verify(repository: Path, kinds: list[str]) -> list[str]:
    """Problems found (empty = the committed graphs are exactly the shipped weights, exported)."""
    problems = []
    for kind in kinds:
        vdir = latest_version_dir(repository / kind)
        cfg = ModelConfigFile.load(vdir / CONFIG_FILE)
        spec = load_spec(shipped_spec_path(kind))
        weights = shipped_weights_path(kind)
        # Compared through the config class, so a field added later with a default still matches.
        if ModelSpec.from_dict(cfg.model).to_dict() != spec.to_dict():
            problems.append(f"{vdir}: model config differs from {shipped_spec_path(kind)}")
        if cfg.weights.sha256 != sha256_file(weights):
            problems.append(
                f"{vdir}: exported from weights {cfg.weights.sha256[:12]}, shipped are {sha256_file(weights)[:12]}"
            )
        model = build_model(spec, weights).eval()
        proto = onnx.load(str(vdir / MODEL_FILE))
        check_graph(kind, proto)
        if cfg.quantization:  # int8: no exact parity; its weights must be these, rounded
            n = check_int8_weights(proto, model)
            log.info("%s: int8 graph's %d conv weights are the shipped weights, rounded", vdir, n)
            continue
        parity = check_parity(kind, model, vdir / MODEL_FILE, tta=cfg.tta)
        log.info("%s: committed graph matches shipped weights, max |torch - ort| = %.3g", vdir, parity.max_abs_diff)
    return problems


def _int8_request(args: argparse.Namespace) -> Int8Request | None:
    if not args.int8:
        return None
    calibration, check = cifar_calibration_split(args.int8, args.calibration_images, args.check_images)
    return Int8Request(calibration, check, source=f"{Path(args.int8).name} training images")


def run(args: argparse.Namespace) -> int:
    for chatty in ("onnxscript", "onnx_ir", "torch.onnx"):  # per-pass INFO lines drown the result
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if args.model != "all" and args.model not in MODEL_KINDS:
        sys.exit(f"unknown --model {args.model!r}; known: {[*MODEL_KINDS, 'all']}")
    kinds = list(MODEL_KINDS) if args.model == "all" else [args.model]
    if args.verify:
        problems = verify(args.repository, kinds)
        for p in problems:
            log.error(p)
        return 1 if problems else 0
    if len(kinds) > 1 and (args.config or args.weights or args.labels or args.name):
        sys.exit("--config, --weights, --labels and --name need a single --model")
    if args.random_init and args.weights:
        sys.exit("--random-init and --weights exclude each other")
    if args.int8 and kinds != ["gncnn"]:
        sys.exit("--int8 is for the classifier: add --model gncnn")
    if args.tta != "none" and kinds != ["gncnn"]:
        sys.exit("--tta is for the classifier: add --model gncnn")
    args.repository.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        try:
            weights = None if args.random_init else (args.weights or shipped_weights_path(kind))
            spec, labels = spec_and_labels(kind, args.config, weights, args.labels)
            result = export_to_repository(
                spec,
                args.repository,
                name=args.name,
                version=args.version,
                weights=weights,
                random_seed=args.seed if args.random_init else None,
                labels=labels,
                overwrite=args.overwrite,
                int8=_int8_request(args),
                tta=args.tta,
            )
        except UserError as exc:
            sys.exit(f"normserve export: error: {exc}")
        except (ValueError, OSError) as exc:  # the files the user named: unreadable, not fitting, exists
            message = str(exc)
            if "do not fit" in message:
                message += (
                    f" (is --config {args.config} the one they were trained with?)"
                    if args.config
                    else " (pass the config they were trained with: --config RUN/config.json)"
                )
            sys.exit(f"normserve export: error: {message}")
        c = result.config
        q = c.quantization
        print(
            f"{result.directory}: parity {c.parity['max_abs_diff']:.2e} (tol {c.parity['tolerance']:g}), "
            + (f"int8 top-1 agreement {q['top1_agreement']:.2%} on {q['check_images']} images, " if q else "")
            + f"trained={c.weights.trained}, ops={c.ops}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="normserve export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))
