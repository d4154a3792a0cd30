"""Which worker processes of one server are ready: each marks itself in the server's runtime
folder once its models are loaded (a file `ready-<pid>` it holds a shared `flock(2)` lock on), and
the readiness endpoint counts the marks; a dead worker's unlocked file is removed by the next
count. Why readiness waits for every worker: docs/design/workers.md.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from normserve.service.cores import open_lock_file, try_flock

MARK_PREFIX = "ready-"


class WorkerRoster:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._mark: int | None = None  # this worker's locked mark, once ready

    def mark_ready(self) -> None:
        """This worker serves from now on (held until `leave` or the process ends)."""
        if self._mark is not None:
            return
        pid = os.getpid()
        pending = self.directory / f".pending-{pid}"
        fd = os.open(pending, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.rename(pending, self.directory / f"{MARK_PREFIX}{pid}")
        self._mark = fd

    def leave(self) -> None:
        if self._mark is not None:
            (self.directory / f"{MARK_PREFIX}{os.getpid()}").unlink(missing_ok=True)
            os.close(self._mark)
            self._mark = None

    def ready_count(self) -> int:
        """Workers of this server that are up and have marked themselves ready."""
        count = 0
        for path in self.directory.glob(f"{MARK_PREFIX}*"):
            try:
                fd = open_lock_file(path)
            except FileNotFoundError:  # left meanwhile
                continue
            try:
                if try_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                    path.unlink(missing_ok=True)  # nobody holds it: its worker died
                else:
                    count += 1  # held: its worker runs
            finally:
                os.close(fd)
        return count
