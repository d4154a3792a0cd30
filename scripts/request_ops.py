"""Interpreter work per request on the event loop's thread, counted rather than timed: Python
bytecode instructions and Python function calls per request of one `normserve bench` workload,
for each checkout given, with the modules whose counts differ most from the first checkout's.

    python -m scripts.request_ops --workload classify /tmp/ab-old /tmp/new            # in process
    python -m scripts.request_ops --socket --workload classify /tmp/ab-old /tmp/new   # over a socket

On a shared VM whose speed drifts by 10-20 % a minute, a few percent of event-loop CPU cannot be
timed, but the bytecode a request executes can be counted exactly.

In process (the default): each checkout's app runs in a subprocess of its own (its `.venv` if it
has one), called as an ASGI app (no sockets, lifespan run, uvloop): `--warmup` requests, then
`--requests` at `--concurrency` timed without tracing (main-thread CPU us per request: noisy,
printed for reference), then the same again under `sys.settrace` with opcode events on the main
thread only (the inference threads are not counted, nor this driver's own receive() and send()).
Each request's scope carries a DisconnectHook where the checkout has one, as `normserve serve`'s
protocol gives it.

`--socket`: a real `normserve serve` of each checkout (one worker) driven by wrk at
`--concurrency` for `--duration` seconds after a 3 s warm-up, counting in the worker the same way
(a `sitecustomize` hook put first on its PYTHONPATH, switched on and off by signals), so the
HTTP protocol, the middleware and what a client closing its connections at the end of a run
costs are counted too; it also counts the objects per request that only the garbage collector
frees (reference cycles). Tracing slows the worker, so batches and timings differ from a bench
run: compare checkouts with each other, not with the bench.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

_STDLIB = re.compile(r".*/lib/python3\.\d+/")


def _short(filename: str, roots: list[str]) -> str:
    """A code object's file, relative to site-packages or the checkout, with `normserve/` dropped
    so that the old layout's `service/x.py` and the new `normserve/service/x.py` compare."""
    if "/site-packages/" in filename:  # before the checkout: its .venv may be inside it
        return filename.split("/site-packages/")[-1]
    for root in roots:
        if filename.startswith(root):
            filename = filename[len(root) :]
            break
    return _STDLIB.sub("", filename).removeprefix("normserve/")


# -- the child: one checkout's app, driven in process -------------------------------------------
def _child(tree: Path, payload: Path, requests: int, concurrency: int, warmup: int) -> None:
    import uvloop

    sys.path.insert(0, str(tree))
    os.environ.setdefault("NORMSERVE_MODEL_REPOSITORY", str(tree / "model_repository"))
    os.environ.setdefault("NORMSERVE_WORKERS", "1")
    try:
        app_module = importlib.import_module("normserve.service.app")
    except ImportError:  # a checkout from before the normserve package
        app_module = importlib.import_module("service.app")
    try:
        from normserve.service.governor import DISCONNECT_HOOK_KEY, DisconnectHook

        hook: tuple[str, Any] | None = (DISCONNECT_HOOK_KEY, DisconnectHook)
    except ImportError:
        hook = None
    path, headers, body = pickle.loads(payload.read_bytes())
    path_only, _, query = path.partition("?")
    base_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    base_headers += [(b"content-length", str(len(body)).encode()), (b"host", b"bench")]
    lifespan_state: dict[str, Any] = {}

    async def call(app: Any) -> None:
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path_only,
            "raw_path": path_only.encode(),
            "query_string": query.encode(),
            "headers": list(base_headers),
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "root_path": "",
            "state": dict(lifespan_state),
        }
        if hook is not None:
            scope[hook[0]] = hook[1]()
        sent = False
        status: list[int] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)  # a client that stays: only a disconnect would come
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        if status != [200]:
            raise SystemExit(f"{path} answered {status}")

    async def burst(app: Any, n: int) -> None:
        async def one(k: int) -> None:
            for _ in range(k):
                await call(app)

        await asyncio.gather(*(one(n // concurrency) for _ in range(concurrency)))

    ops: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    roots = [str(tree) + "/"]

    this_file = str(Path(__file__).resolve())

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == this_file:
            return None  # this driver's own receive() and send(): not the server's work
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        key = _short(frame.f_code.co_filename, roots)
        if event == "call":
            calls[key] += 1

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                ops[key] += 1
            return local

        return local

    async def main() -> dict[str, Any]:
        app = app_module.create_app()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def lifespan_receive() -> dict[str, Any]:
            return await queue.get()

        async def lifespan_send(message: dict[str, Any]) -> None:
            pass

        await queue.put({"type": "lifespan.startup"})
        life = asyncio.create_task(
            app(
                {"type": "lifespan", "asgi": {"version": "3.0"}, "state": lifespan_state},
                lifespan_receive,
                lifespan_send,
            )
        )
        for _ in range(300):  # until the models are ready
            try:
                await call(app)
                break
            except (Exception, SystemExit):
                await asyncio.sleep(0.1)
        await burst(app, warmup)
        n = requests - requests % concurrency
        cpu = time.thread_time()
        await burst(app, n)
        main_us = (time.thread_time() - cpu) / n * 1e6
        sys.settrace(tracer)
        await burst(app, n)
        sys.settrace(None)
        await queue.put({"type": "lifespan.shutdown"})
        await life
        return {"requests": n, "main_cpu_us": main_us, "ops": ops, "calls": calls}

    result = uvloop.run(main())
    print("REQUEST_OPS " + json.dumps(result))


# -- over a socket: a hook in the worker, switched by signals --------------------------------------
_HOOK = r"""
import collections, gc, json, os, re, signal, sys
if os.environ.get("REQUEST_OPS_OUT"):
    _ops, _calls = collections.Counter(), collections.Counter()
    _lib = re.compile(r".*/lib/python3\.\d+/")
    _root = os.environ["REQUEST_OPS_ROOT"]
    def _key(co):
        f = co.co_filename
        if "/site-packages/" in f:
            return f.split("/site-packages/")[-1]
        return (f[len(_root):] if f.startswith(_root) else _lib.sub("", f)).removeprefix("normserve/")
    class _Local:  # a frame's opcode counter (a class, not a closure: a closure that returns
        __slots__ = ("key",)  # itself is a reference cycle per frame, counted as garbage below)
        def __init__(self, key):
            self.key = key
        def __call__(self, frame, event, arg):
            if event == "opcode":
                _ops[self.key] += 1
            return self
    def _tracer(frame, event, arg):
        frame.f_trace_opcodes, frame.f_trace_lines = True, False
        key = _key(frame.f_code)
        if event == "call":
            _calls[key] += 1
        return _Local(key)
    def _on(signum, frame):
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        _ops.clear(); _calls.clear()
        sys.settrace(_tracer)
        while frame is not None:  # the frames running now (the event loop) are traced too
            frame.f_trace = _tracer(frame, "start", None)
            frame = frame.f_back
    def _off(signum, frame):
        sys.settrace(None)
        gc.collect()
        gc.set_debug(0)
        garbage = collections.Counter(type(o).__qualname__ for o in gc.garbage)
        gc.garbage.clear()
        out = {"ops": _ops, "calls": _calls, "garbage": garbage}
        with open(os.path.join(os.environ["REQUEST_OPS_OUT"], f"{os.getpid()}.json"), "w") as f:
            json.dump(out, f)
    signal.signal(signal.SIGUSR2, _on)
    signal.signal(signal.SIGUSR1, _off)
"""


def _run_socket(tree: Path, workload: Any, args: argparse.Namespace) -> dict[str, Any]:
    import signal

    import psutil

    from normserve.bench.servers import start, stop
    from normserve.bench.wrk import Wrk, find_wrk

    wrk = Wrk(find_wrk())
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(_HOOK)
        env = {"PYTHONPATH": tmp, "REQUEST_OPS_OUT": tmp, "REQUEST_OPS_ROOT": str(tree) + "/", "NORMSERVE_WORKERS": "1"}
        python = tree / ".venv/bin/python"
        server = start(
            "normserve",
            Path(tmp) / "server.log",
            repository=tree / "model_repository",
            checkout=tree,
            python=str(python) if python.exists() else None,
            env=env,
        )
        try:
            children = psutil.Process(server.process.pid).children(recursive=True)
            pids = [p.pid for p in children if p.cmdline()[-1] == "--multiprocessing-fork"] or [server.process.pid]
            wrk.run(server.base_url, workload, args.concurrency, 3.0)
            for pid in pids:
                os.kill(pid, signal.SIGUSR2)
            result = wrk.run(server.base_url, workload, args.concurrency, args.duration)
            for pid in pids:
                os.kill(pid, signal.SIGUSR1)
            files = [Path(tmp) / f"{pid}.json" for pid in pids]
            for _ in range(100):
                if all(f.exists() for f in files):
                    break
                time.sleep(0.1)
            ops: collections.Counter[str] = collections.Counter()
            calls: collections.Counter[str] = collections.Counter()
            garbage: collections.Counter[str] = collections.Counter()
            for f in files:
                counted = json.loads(f.read_text())
                ops.update(counted["ops"])
                calls.update(counted["calls"])
                garbage.update(counted["garbage"])
        finally:
            stop(server)
    return {"requests": result.requests, "main_cpu_us": float("nan"), "ops": ops, "calls": calls, "garbage": garbage}


# -- the parent: run each checkout, print the counts ----------------------------------------------
def _run_tree(tree: Path, payload: Path, args: argparse.Namespace) -> dict[str, Any]:
    python = tree / ".venv/bin/python"
    command = [str(python if python.exists() else Path(sys.executable))]
    command += [str(Path(__file__).resolve()), "--child", str(tree), "--payload", str(payload)]
    command += ["--requests", str(args.requests), "--concurrency", str(args.concurrency), "--warmup", str(args.warmup)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")}
    env["NORMSERVE_ACCESS_LOG"] = os.environ.get("NORMSERVE_ACCESS_LOG", "true")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=tree)
    for line in done.stdout.splitlines():
        if line.startswith("REQUEST_OPS "):
            result: dict[str, Any] = json.loads(line.removeprefix("REQUEST_OPS "))
            return result
    raise SystemExit(f"{tree}: no result (exit {done.returncode})\n{done.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trees", nargs="*", type=Path)
    p.add_argument("--workload", default="classify", help="a `normserve bench` workload (classify, v2)")
    p.add_argument("--requests", type=int, default=800)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--top", type=int, default=15, help="modules listed by their difference from the first tree")
    p.add_argument("--socket", action="store_true", help="a real server driven by wrk, not the app in process")
    p.add_argument("--duration", type=float, default=10.0, help="--socket: seconds counted")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--payload", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        _child(args.child, args.payload, args.requests, args.concurrency, args.warmup)
        return 0
    if not args.trees:
        p.error("give at least one checkout")
    from normserve.bench.payloads import build_workloads

    workload = build_workloads([args.workload])[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "payload.pickle"
        payload.write_bytes(pickle.dumps((workload.path, workload.headers, workload.body)))
        for tree in args.trees:
            if args.socket:
                results.append(_run_socket(tree.resolve(), workload, args))
            else:
                results.append(_run_tree(tree.resolve(), payload, args))
    how = f"over a socket, {args.duration:g} s" if args.socket else f"in process, {args.requests} requests"
    print(f"{args.workload}: {how} at concurrency {args.concurrency}, event-loop thread")
    print(
        f"{'checkout':<40} {'opcodes/req':>12} {'py calls/req':>13} {'CPU us/req (timed, noisy)':>26} {'cycle garbage/req':>18}"
    )
    per_request = []
    for tree, r in zip(args.trees, results, strict=True):
        n = r["requests"]
        ops = {k: v / n for k, v in r["ops"].items()}
        per_request.append(ops)
        garbage = sum(r["garbage"].values()) / n if "garbage" in r else float("nan")
        timed = f"{r['main_cpu_us']:>26,.0f}" if r["main_cpu_us"] == r["main_cpu_us"] else f"{'-':>26}"
        cycles = f"{garbage:>18,.2f}" if garbage == garbage else f"{'-':>18}"
        print(f"{tree!s:<40} {sum(ops.values()):>12,.0f} {sum(r['calls'].values()) / n:>13,.1f} {timed} {cycles}")
        if r.get("garbage"):
            print(
                "    in cycles, per request: " + ", ".join(f"{k} {v / n:.2f}" for k, v in r["garbage"].most_common(8))
            )
    if len(results) > 1:
        first = per_request[0]
        for tree, ops in zip(args.trees[1:], per_request[1:], strict=True):
            print(f"\nopcodes/req by module, {tree} against {args.trees[0]}:")
            keys = sorted(set(first) | set(ops), key=lambda k: -abs(ops.get(k, 0) - first.get(k, 0)))
            for key in keys[: args.top]:
                a, b = first.get(key, 0.0), ops.get(key, 0.0)
                print(f"  {a:8,.0f} {b:8,.0f} {b - a:+8,.0f}  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
