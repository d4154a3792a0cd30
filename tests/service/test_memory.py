"""Memory returned after a burst (service/memory.py): the heap is trimmed once a worker is quiet
after activity, never while idle from the start and never during a burst. What it buys in RSS is
measured by scripts/idle_rss.py (docs/limits-http.md), not asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from images import png
from servers import REPO_ROOT

from normserve.service.memory import MALLOC_TRIM, trim_memory
from normserve.service.state import server_state

ClientFactory = Callable[..., TestClient]

pytestmark = pytest.mark.skipif(MALLOC_TRIM is None, reason="no glibc malloc_trim here")


def test_trim_once_quiet_after_activity(app_client: ClientFactory) -> None:
    client = app_client(memory_trim_idle_s=0.2, warmup=False)
    time.sleep(0.6)
    assert server_state(client.app).trimmer.trims == 0  # nothing happened: nothing to give back
    assert client.post("/classify", content=png(64, 64), headers={"content-type": "image/png"}).status_code == 200
    deadline = time.monotonic() + 5
    while server_state(client.app).trimmer.trims == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server_state(client.app).trimmer.trims == 1
    time.sleep(0.6)
    assert server_state(client.app).trimmer.trims == 1  # once per quiet spell


def test_no_trim_while_requests_keep_coming(app_client: ClientFactory) -> None:
    client = app_client(memory_trim_idle_s=0.5, warmup=False)
    until = time.monotonic() + 1.5
    while time.monotonic() < until:  # a request at least every 0.1 s: never quiet for 0.5 s
        client.get("/v2/health/live")
        time.sleep(0.05)
    assert server_state(client.app).trimmer.trims == 0


def test_off_when_zero(app_client: ClientFactory) -> None:
    client = app_client(memory_trim_idle_s=0, warmup=False)
    client.get("/v2/health/live")
    time.sleep(0.3)
    assert server_state(client.app).trimmer.trims == 0


@pytest.mark.parametrize("arena", [True, False])
def test_shrinking_the_arena_leaves_every_model_serving(app_client: ClientFactory, arena: bool) -> None:
    """The shrink run works with ORT's arena on (the default) and is skipped with it off (ORT
    refuses the shrink option then); the models answer as before either way."""
    client = app_client(cpu_mem_arena=arena, memory_trim_idle_s=0)
    before = client.post("/reconstruct", content=png(40, 30), headers={"content-type": "image/png"})
    trim_memory(server_state(client.app).repository.all())
    after = client.post("/reconstruct", content=png(40, 30), headers={"content-type": "image/png"})
    assert before.status_code == after.status_code == 200 and before.content == after.content


def test_malloc_arena_cap() -> None:
    from normserve.service.memory import limit_malloc_arenas

    assert limit_malloc_arenas(0) is False  # 0: glibc's default, nothing set
    assert limit_malloc_arenas(64) is True  # glibc accepts it (a generous cap: this test process has threads)


def test_memprobe_dumps_a_process_on_sigusr2(tmp_path: Path) -> None:
    """scripts/memprobe (the in-process view that found issue 26's held arena regions) keeps
    working: a process with it on PYTHONPATH writes its view on SIGUSR2, a live array and who
    holds it included."""
    code = (
        "import os, signal, time, numpy as np\n"
        "kept = {'image': np.ones((1, 3, 128, 128), np.float32)}\n"
        "holder = [kept]\n"
        "os.kill(os.getpid(), signal.SIGUSR2)\n"
        "deadline = time.monotonic() + 60\n"
        "while not list(__import__('pathlib').Path(os.environ['MEMPROBE_DIR']).glob('*.json')):\n"
        "    assert time.monotonic() < deadline\n"
        "    time.sleep(0.05)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "scripts" / "memprobe"), "MEMPROBE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    (dump,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    for step in ("as_is", "malloc_trim", "gc", "shrink"):
        view = dump[step]
        assert view["rollup_kib"]["Anonymous"] > 0 and view["malloc_info"] and view["pymalloc"]["arenas_now"] > 0
    (array,) = [a for a in dump["arrays"] if a["shape"] == [1, 3, 128, 128]]
    assert array["kib"] == 192 and "list > dict(image)" in array["held_by"]
