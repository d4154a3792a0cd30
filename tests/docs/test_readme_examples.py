"""The README's examples work as written: every `curl` line and every Python block runs against
the real `normserve serve` (one worker, the committed repository) from a folder holding the files
the examples name, with only `localhost:8000` replaced by the test server's address."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from servers import Server, running_server

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
SAMPLES = REPO_ROOT / "service" / "static" / "samples"
ADDRESS = "localhost:8000"
GRPC_ADDRESS = "localhost:8001"

pytestmark = pytest.mark.e2e


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def curl_lines(text: str) -> list[str]:
    """The `curl` commands of the README's bash blocks, without their trailing comments."""
    lines = [line for block in code_blocks(text, "bash") for line in block.splitlines()]
    return [re.sub(r"\s+#.*$", "", line) for line in lines if line.startswith("curl ")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("readme") / "server.log", "--workers", "1") as server:
        yield server


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The files the examples name: cat.png, noisy.png and photo.jpg."""
    shutil.copy(SAMPLES / "frog.png", tmp_path / "cat.png")
    shutil.copy(SAMPLES / "sailboat.png", tmp_path / "noisy.png")
    Image.open(SAMPLES / "car.png").convert("RGB").save(tmp_path / "photo.jpg", quality=90)
    return tmp_path


def test_the_readme_has_examples() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(curl_lines(text)) >= 8
    assert len(code_blocks(text, "python")) >= 2


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("command", curl_lines(README.read_text(encoding="utf-8")))
def test_curl_example(server: Server, workdir: Path, command: str) -> None:
    command = command.replace(ADDRESS, server.address).replace("curl ", "curl --fail --silent --show-error ", 1)
    done = subprocess.run(command, shell=True, cwd=workdir, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    written = re.search(r"-o (\S+)$", command)
    if written:
        assert (workdir / written.group(1)).stat().st_size > 0
    else:
        assert done.stdout.lstrip().startswith(b"{")


@pytest.mark.parametrize("index", range(len(code_blocks(README.read_text(encoding="utf-8"), "python"))))
def test_python_example(server: Server, workdir: Path, index: int) -> None:
    code = code_blocks(README.read_text(encoding="utf-8"), "python")[index]
    code = code.replace(ADDRESS, server.address).replace(GRPC_ADDRESS, f"127.0.0.1:{server.grpc_port}")
    done = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the example prints its answer"
