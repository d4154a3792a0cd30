"""The core lock (service/cores.py): a wide run only when nothing else runs, in any thread or
process; a narrow run waits only while a wide one is in progress, and is not starved by the next."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from normserve.service.cores import WAITING_FILE, CoreLock, open_lock_file, try_flock

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 10.0  # upper bound for something that must happen (never reached when it works)


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


class _Run(threading.Thread):
    """A run in another thread: takes the lock, reports what it got, holds until released."""

    def __init__(self, lock: CoreLock, wide: bool) -> None:
        super().__init__(daemon=True)
        self.lock, self.wide = lock, wide
        self.got: bool | None = None  # set once the lock is held: True = wide
        self.release = threading.Event()

    def run(self) -> None:
        with self.lock.hold(self.wide) as got:
            self.got = got
            self.release.wait(WAIT_S)

    def finish(self) -> None:
        self.release.set()
        self.join(WAIT_S)
        assert not self.is_alive()


@contextmanager
def _held_in_another_process(directory: Path, wide: bool) -> Iterator[subprocess.Popen[str]]:
    code = (
        "import sys; from pathlib import Path; from normserve.service.cores import CoreLock\n"
        f"with CoreLock(Path({str(directory)!r})).hold({wide}) as got:\n"
        "    print(got, flush=True); sys.stdin.readline()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == str(wide)  # it holds the lock now
        yield process
    finally:
        process.kill()
        process.wait(WAIT_S)


def _waiting_marked(directory: Path) -> bool:
    fd = open_lock_file(directory / WAITING_FILE)
    try:
        return not try_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_run_alone_goes_wide_and_narrow_runs_share(tmp_path: Path) -> None:
    lock = CoreLock(tmp_path)
    with lock.hold(True) as wide:
        assert wide
    with lock.hold(False) as first, lock.hold(False) as second:  # narrow runs never wait for each other
        assert (first, second) == (False, False)
        with lock.hold(True) as wide:  # beside them, a wide run is refused and runs narrow
            assert wide is False
    with lock.hold(True) as wide:  # they ended: wide again
        assert wide


def test_a_narrow_run_waits_while_a_wide_run_is_in_progress(tmp_path: Path) -> None:
    lock = CoreLock(tmp_path)
    wide = _Run(lock, True)
    wide.start()
    _until(lambda: wide.got is not None, "the wide run holds the lock")
    assert wide.got is True
    narrow = _Run(lock, False)
    narrow.start()
    _until(lambda: _waiting_marked(tmp_path), "the narrow run marks itself waiting")
    assert narrow.got is None, "a narrow run started beside a wide one"
    wide.finish()
    _until(lambda: narrow.got is not None, "the narrow run starts once the wide one ended")
    assert narrow.got is False
    narrow.finish()
    assert not _waiting_marked(tmp_path)


def test_no_wide_run_starts_while_a_narrow_one_waits(tmp_path: Path) -> None:
    # Otherwise back-to-back wide runs from one worker could keep the others waiting for good:
    # when a wide run ends, the next one could take the lock before the woken waiter does.
    lock = CoreLock(tmp_path)
    fd = os.open(tmp_path / WAITING_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a run is marked waiting but has not got its share yet
        with lock.hold(True) as wide:
            assert wide is False, "a wide run started while another run waited"
    finally:
        os.close(fd)
    with lock.hold(True) as wide:
        assert wide


@pytest.mark.parametrize("other_wide", [False, True])
def test_runs_in_other_processes_count_and_a_dead_process_holds_nothing(tmp_path: Path, other_wide: bool) -> None:
    lock = CoreLock(tmp_path)
    with _held_in_another_process(tmp_path, other_wide) as other:
        if other_wide:
            narrow = _Run(lock, False)
            narrow.start()
            _until(lambda: _waiting_marked(tmp_path), "this process's run waits for the other's wide run")
            other.kill()  # dies mid-run: the kernel drops its lock
            _until(lambda: narrow.got is not None, "the run starts once the other process is gone")
            narrow.finish()
        else:
            with lock.hold(True) as wide:
                assert wide is False  # another worker runs: this one takes its share
            other.kill()
            other.wait(WAIT_S)
            with lock.hold(True) as wide:
                assert wide
