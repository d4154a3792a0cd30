"""Which ONNX Runtime runs may use every core of the machine: `flock(2)` locks shared by every
worker process (and every inference thread) of one server, in `NORMSERVE_RUNTIME_DIR`.

A run of at least `NORMSERVE_WIDE_RUN_PIXELS` that starts while no other run is in progress takes
the exclusive lock and runs on the model's wide session (every core); every other run holds a
shared lock. A run that had to wait marks itself, and no wide run starts while anyone is marked.
Why, and what it measured: docs/design/cores.md.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RUNS_FILE = "runs.lock"  # shared: a run in progress; exclusive: a wide run in progress
WAITING_FILE = "waiting.lock"  # shared: a run waits for a wide one to end


class CoreLock:
    """The locks of one server, in its runtime folder."""

    def __init__(self, directory: Path) -> None:
        self._runs = directory / RUNS_FILE
        self._waiting = directory / WAITING_FILE
        for path in (self._runs, self._waiting):
            path.touch(exist_ok=True)

    @contextmanager
    def hold(self, wide: bool) -> Iterator[bool]:
        """Hold the lock for one run; yields True when the run may use every core. `wide`: the
        run would use every core if nothing else runs."""
        runs = open_lock_file(self._runs)
        try:
            if not (wide and self._try_wide(runs)):
                self._share(runs)
                wide = False
            yield wide
        finally:
            os.close(runs)  # releases the lock

    def _try_wide(self, runs: int) -> bool:
        waiting = open_lock_file(self._waiting)
        try:
            # Nobody waiting, then nobody running; the waiting lock is let go at once.
            return try_flock(waiting, fcntl.LOCK_EX | fcntl.LOCK_NB) and try_flock(runs, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(waiting)

    def _share(self, runs: int) -> None:
        if try_flock(runs, fcntl.LOCK_SH | fcntl.LOCK_NB):
            return
        waiting = open_lock_file(self._waiting)  # a wide run is in progress: mark, then wait for its end
        try:
            fcntl.flock(waiting, fcntl.LOCK_SH)
            fcntl.flock(runs, fcntl.LOCK_SH)  # blocking; the GIL is released meanwhile
        finally:
            os.close(waiting)


def open_lock_file(path: Path) -> int:
    """A descriptor to flock: each open file is its own lock holder, threads of one process too."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def try_flock(fd: int, operation: int) -> bool:
    """flock without waiting (`operation` includes LOCK_NB); False when another holder conflicts."""
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        return False
    return True
