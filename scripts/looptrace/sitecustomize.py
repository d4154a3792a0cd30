"""Event-loop tracer for a `normserve serve` started by scripts/loop_stalls.py --trace (a
diagnostic, never imported by the service): with NORMSERVE_LOOPTRACE=<folder> in the environment
and this folder first on PYTHONPATH, every process of the server writes to
<folder>/loop-<pid>.jsonl each event-loop iteration whose busy time (outside the selector's wait)
passed NORMSERVE_LOOPTRACE_MS: its wall and CPU milliseconds (CPU: this thread's, so wall minus
CPU is time spent waiting for a core or for the GIL), how many callbacks it ran, and the slowest
of them. uvloop cannot be traced from Python, so the server runs on asyncio's own loop here.
"""

from __future__ import annotations

import os

FOLDER = os.environ.get("NORMSERVE_LOOPTRACE")
if FOLDER:
    import asyncio.base_events
    import asyncio.events
    import json
    import selectors
    import sys
    import time

    sys.modules["uvloop"] = None  # type: ignore[assignment]  # uvicorn's "auto" loop falls back to asyncio
    threshold = float(os.environ.get("NORMSERVE_LOOPTRACE_MS", "10")) / 1000
    out = open(os.path.join(FOLDER, f"loop-{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
    state: dict = {"select": 0.0, "callbacks": [], "n": 0}
    run_handle = asyncio.events.Handle._run
    select = selectors.EpollSelector.select
    run_once = asyncio.base_events.BaseEventLoop._run_once

    def _run(self):  # type: ignore[no-untyped-def]
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return run_handle(self)
        finally:
            wall = time.perf_counter() - wall
            if wall > 0.002:
                state["callbacks"].append((wall, time.thread_time() - cpu, repr(self)[:300]))
            state["n"] += 1

    def _select(self, timeout=None):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return select(self, timeout)
        finally:
            state["select"] += time.perf_counter() - started

    def _run_once(self):  # type: ignore[no-untyped-def]
        state.update(select=0.0, callbacks=[], n=0)
        wall, cpu = time.perf_counter(), time.thread_time()
        run_once(self)
        busy = time.perf_counter() - wall - state["select"]
        if busy > threshold:
            slowest = sorted(state["callbacks"], reverse=True)[:5]
            line = {
                "t": time.time(),
                "wall_ms": round(busy * 1000, 1),
                "cpu_ms": round((time.thread_time() - cpu) * 1000, 1),
                "callbacks": state["n"],
                "slowest": [(round(w * 1000, 1), round(c * 1000, 1), what) for w, c, what in slowest],
            }
            out.write(json.dumps(line) + "\n")

    asyncio.events.Handle._run = _run  # type: ignore[method-assign]
    selectors.EpollSelector.select = _select  # type: ignore[method-assign]
    asyncio.base_events.BaseEventLoop._run_once = _run_once  # type: ignore[attr-defined]
