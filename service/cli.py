"""The `normserve` command: `serve` the model repository, `export` models (needs the export extra),
`bench` the server against raw ORT and a naive app (needs wrk); `eval` a served model through
ONNX Runtime (needs the eval extra)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from evaluation.args import add_arguments as add_eval_arguments
from export.args import add_arguments


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    # CLI flags become settings through the environment, so every worker process reads the same.
    for key, value in (("MODEL_REPOSITORY", args.model_repository), ("LOG_LEVEL", args.log_level)):
        if value is not None:
            os.environ[f"NORMSERVE_{key}"] = str(value)
    if args.workers is not None:
        os.environ["NORMSERVE_WORKERS"] = str(args.workers)
    from service.settings import default_workers, get_settings

    settings = get_settings()  # fail now, with a clear message, on a bad setting
    # Not set by the flag, the environment or .env: serve's default, one per CPU, at most 2.
    workers = settings.workers if "workers" in settings.model_fields_set else default_workers()
    os.environ["NORMSERVE_WORKERS"] = str(workers)  # resolved: what every worker reads
    get_settings.cache_clear()
    settings = get_settings()
    made: list[str] = []  # folders this start made, removed when the server has stopped

    def fresh_folder(variable: str, prefix: str) -> None:
        os.environ[variable] = folder = tempfile.mkdtemp(prefix=prefix)
        made.append(folder)

    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        fresh_folder("PROMETHEUS_MULTIPROC_DIR", "normserve-metrics-")  # workers share metrics through files
    if settings.runtime_dir is None:  # ... and core locks and readiness marks (service/cores.py, workers.py)
        fresh_folder("NORMSERVE_RUNTIME_DIR", "normserve-run-")
    from service.shutdown import serve

    config = uvicorn.Config(
        "service.app:create_app",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=workers,
        log_level=settings.log_level,
        access_log=False,  # the app logs each request itself (NORMSERVE_ACCESS_LOG, JSON lines)
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )
    try:
        return serve(config)  # uvicorn's server with a graceful drain on SIGTERM (service/shutdown.py)
    finally:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def _export(args: argparse.Namespace) -> int:
    try:
        from export.cli import run
    except ModuleNotFoundError as exc:  # torch / onnx missing
        sys.exit(f"normserve export needs the export extra (pip install 'normserve[export]'): {exc}")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


def _train(argv: list[str]) -> int:
    try:
        from models.train import main as train_main
    except ModuleNotFoundError as exc:
        sys.exit(f"normserve train needs the export and train extras (pip install 'normserve[export,train]'): {exc}")
    return train_main(argv)


def _bench(argv: list[str]) -> int:
    try:
        from bench.cli import main as bench_main
    except ModuleNotFoundError as exc:  # psutil (soak RSS) is in the bench extra
        sys.exit(f"normserve bench needs the bench extra (pip install 'normserve[bench]'): {exc}")
    return bench_main(argv)


def _eval(args: argparse.Namespace) -> int:
    import logging

    from evaluation.cli import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normserve", description="normserve: GN classifier and IN denoiser on ONNX Runtime"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the model repository over HTTP")
    serve.add_argument("--host", help="bind address (default: NORMSERVE_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: NORMSERVE_PORT or 8000)")
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes (default: NORMSERVE_WORKERS; unset or 0: one per CPU, at most 2)",
    )
    serve.add_argument("--model-repository", help="model repository folder (NORMSERVE_MODEL_REPOSITORY)")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_serve)

    export = sub.add_parser("export", help="export models to ONNX into the repository (needs torch)")
    add_arguments(export)
    export.set_defaults(func=_export)

    # Its arguments live with the training code (torch); parsed there so `--help` needs no torch here.
    train = sub.add_parser("train", help="train a model: classifier | denoiser (needs torch)", add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=lambda args: _train(args.rest))

    bench = sub.add_parser("bench", help="throughput/latency vs raw ORT and a naive app (wrk; --help)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=lambda args: _bench(args.rest))
    evaluate = sub.add_parser("eval", help="evaluate a model through ONNX Runtime: classifier | denoiser")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # every argument, --help included, belongs to the trainer
        return _train(argv[1:])
    if argv[:1] == ["bench"]:  # likewise: bench parses its own arguments
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
