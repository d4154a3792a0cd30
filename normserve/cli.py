"""The `normserve` command: `serve` the model repository, `export` models (needs the export extra),
`bench` the server against raw ORT and a naive app (needs wrk); `eval` a served model through
ONNX Runtime (needs the eval extra)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import NoReturn

from normserve import __version__
from normserve.evaluation.args import add_arguments as add_eval_arguments
from normserve.export.args import add_arguments


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    # CLI flags become settings through the environment, so every worker process reads the same.
    for key, value in (
        ("MODEL_REPOSITORY", args.model_repository),
        ("LOG_LEVEL", args.log_level),
        ("HOST", args.host),  # the gRPC server listens on the same address as HTTP
        ("GRPC_PORT", args.grpc_port),
    ):
        if value is not None:
            os.environ[f"NORMSERVE_{key}"] = str(value)
    if args.workers is not None:
        os.environ["NORMSERVE_WORKERS"] = str(args.workers)
    from pydantic import ValidationError

    from normserve.service.settings import default_workers, get_settings

    try:
        settings = get_settings()  # fail now, with a clear message, on a bad setting
    except ValidationError as exc:
        problems = "; ".join(
            (f"NORMSERVE_{'_'.join(map(str, e['loc'])).upper()}={e.get('input')!r}: " if e["loc"] else "") + e["msg"]
            for e in exc.errors()
        )
        sys.exit(f"normserve serve: error: bad setting: {problems}")
    if not settings.model_repository.is_dir():
        sys.exit(
            f"normserve serve: error: model repository {settings.model_repository} is not a folder "
            "(--model-repository or NORMSERVE_MODEL_REPOSITORY)"
        )
    if settings.tracing:
        from normserve.service.tracing import TracingUnavailable, require_packages

        try:
            require_packages()
        except TracingUnavailable as exc:
            sys.exit(f"normserve serve: {exc}")
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
    from normserve.service.shutdown import serve

    config = uvicorn.Config(
        "normserve.service.app:create_app",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=workers,
        log_level=settings.log_level,
        access_log=False,  # the app logs each request itself (NORMSERVE_ACCESS_LOG, JSON lines)
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        # HTTP limits (service/http_limits.py): httptools with a header size limit and read timeouts
        http="normserve.service.http_limits:LimitedHttpToolsProtocol",
        limit_concurrency=settings.max_connections or None,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # uvicorn takes a float too
    )
    from normserve.service.http_limits import HttpLimits

    config.http_limits = HttpLimits.from_settings(settings)  # type: ignore[attr-defined]  # read by the protocol
    try:
        return serve(config)  # uvicorn's server with a graceful drain on SIGTERM (service/shutdown.py)
    finally:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def _missing_extra(command: str, extra: str, exc: ModuleNotFoundError) -> NoReturn:
    """Leave with the install command that works from a checkout (normserve is not on an index)."""
    sys.exit(
        f"normserve {command} needs the {extra} extra, which is not installed ({exc.name} is missing).\n"
        f"From the normserve checkout: pip install -e '.[{extra}]'"
    )


def _wants_help(argv: list[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)


def _export(args: argparse.Namespace) -> int:
    try:
        from normserve.export.cli import run
    except ModuleNotFoundError as exc:  # torch / onnx missing
        _missing_extra("export", "export", exc)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


def _train(argv: list[str]) -> int:
    from normserve.models.train_args import build_parser as train_parser

    args = train_parser().parse_args(argv)  # --help and usage errors need no torch
    try:
        from normserve.models.train import run_train
    except ModuleNotFoundError as exc:
        _missing_extra("train", "export,train", exc)
    import logging
    import shlex

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_train(args, shlex.join(["normserve", "train", *argv]))
    except (ValueError, OSError) as exc:  # the data, run folder or weights the user named
        sys.exit(f"normserve train: error: {exc}")


def _bench(argv: list[str]) -> int:
    if _wants_help(argv):
        from normserve.bench.args import build_parser as bench_parser

        bench_parser().parse_args(argv)  # prints the help and leaves
    try:
        from normserve.bench.cli import main as bench_main
    except ModuleNotFoundError as exc:  # psutil (soak RSS) is in the bench extra
        _missing_extra("bench", "bench", exc)
    return bench_main(argv)


def _eval(args: argparse.Namespace) -> int:
    import logging

    try:
        from normserve.evaluation.cli import run
    except ModuleNotFoundError as exc:
        _missing_extra("eval", "eval", exc)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normserve", description="normserve: GN classifier and IN denoiser on ONNX Runtime"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the model repository over HTTP and gRPC")
    serve.add_argument("--host", help="bind address (default: NORMSERVE_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: NORMSERVE_PORT or 8000)")
    serve.add_argument(
        "--grpc-port", type=int, help="gRPC port (default: NORMSERVE_GRPC_PORT or 8001; NORMSERVE_GRPC=false: off)"
    )
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
