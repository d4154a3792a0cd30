"""docs/own-model.md, run as a user would: every command of its `bash` blocks, in order, exactly as
written, in an empty folder holding a small generated data set (two classes of a few images
each, a few clean images for the denoiser, and the doc's two placeholder images). The one
command the doc runs "in a second terminal", `normserve serve`, runs in the background; the
server's address is the doc's `localhost:8000` with the port swapped for a free one (the only
change made to a command). Then the answers are checked: the served labels are the data's class
folders, over a real socket, before and after a new version is put into the running server."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DOC = Path(__file__).resolve().parents[2] / "docs" / "own-model.md"
CLASSES = {"boat": (40, 70, 200), "kitty": (210, 140, 40)}  # class -> mean colour: learnable in an epoch
COMMAND_TIMEOUT_S = 180


def doc_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks, in order (a trailing backslash continues a line)."""
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def _noise_image(rng: np.random.Generator, colour: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    pixels = np.asarray(colour, np.float32) + rng.normal(0, 25, (size[1], size[0], 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def make_user_folder(folder: Path) -> None:
    """What the doc tells the user to have: my_images/{train,test}/<class>/, my_clean/, and the
    two placeholder images photo.jpg and noisy.png."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for cls, colour in CLASSES.items():
            target = folder / "my_images" / split / cls
            target.mkdir(parents=True)
            for i in range(count):
                _noise_image(rng, colour, (48 + 8 * i, 40)).save(target / f"{i:04d}.jpg", quality=90)
    (folder / "my_clean").mkdir()
    for i in range(3):
        y, x = np.mgrid[0:112, 0:128]
        smooth = np.stack([x * 2, y * 2, (x + y)], axis=-1) % 256
        Image.fromarray(smooth.astype(np.uint8)).rotate(30 * i).save(folder / "my_clean" / f"{i:04d}.png")
    _noise_image(rng, CLASSES["boat"], (64, 48)).save(folder / "photo.jpg", quality=90)
    _noise_image(rng, (120, 120, 120), (80, 60)).save(folder / "noisy.png")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Ran:
    command: str
    stdout: str


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Ran]]]:
    """Run every command of the doc in order; yields the folder and each command's output."""
    if shutil.which("curl") is None:
        pytest.skip("the walkthrough's commands call curl, which is not installed (apt-get install curl)")
    folder = tmp_path_factory.mktemp("user")
    make_user_folder(folder)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this checkout's normserve
    env |= {"NORMSERVE_PORT": str(port), "NORMSERVE_WORKERS": "1", "NORMSERVE_LOG_LEVEL": "warning"}
    ran: list[Ran] = []
    server: subprocess.Popen[bytes] | None = None
    server_log = folder / "server.log"
    try:
        for command in doc_commands(DOC.read_text()):
            command = command.replace("localhost:8000", f"127.0.0.1:{port}")
            if "normserve serve" in command:  # "in a second terminal"
                assert server is None, "the doc starts the server once"
                with server_log.open("wb") as log:
                    server = subprocess.Popen(
                        ["bash", "-c", command],
                        cwd=folder,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                continue
            done = subprocess.run(
                ["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
            )
            log_text = server_log.read_text(errors="replace") if server_log.exists() else ""
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}\nserver log:\n{log_text}"
            ran.append(Ran(command, done.stdout))
        yield folder, ran
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)


def _outputs(ran: list[Ran], fragment: str) -> list[str]:
    return [r.stdout for r in ran if fragment in r.command]


def test_the_doc_runs_the_path_it_describes() -> None:
    """The parsed commands are the walkthrough's: train, export, serve, ask; twice for the
    classifier (the second export goes into the running server), once for the denoiser."""
    commands = doc_commands(DOC.read_text())
    assert [c.split()[1] for c in commands if c.startswith("normserve ")] == [
        "train",
        "export",
        "train",
        "export",
        "train",
        "export",
    ]
    assert sum("normserve serve" in c for c in commands) == 1
    for command in commands:
        shlex.split(command)  # each is one well-formed shell line


@pytest.mark.e2e
@pytest.mark.slow
def test_served_labels_are_the_data_classes(walkthrough: tuple[Path, list[Ran]]) -> None:
    folder, ran = walkthrough
    first, second = (json.loads(out) for out in _outputs(ran, "/classify"))
    for answer in (first, second):
        labels = [p["label"] for p in answer["predictions"]]
        assert sorted(labels) == sorted(CLASSES), answer  # two classes: both, by default
        assert answer["trained"] is True and answer["model"] == "gncnn"
    assert (first["version"], second["version"]) == ("1", "2")  # the new version took over while serving
    (metadata,) = (json.loads(r.stdout) for r in ran if r.command.endswith("/v2/models/gncnn"))
    assert metadata["labels"] == sorted(CLASSES) and metadata["versions"] == ["1"]
    # The run's config.json names the labels, and the repository holds both versions.
    assert json.loads((folder / "runs" / "my_cls" / "config.json").read_text())["labels"] == sorted(CLASSES)
    assert sorted(p.name for p in (folder / "my_repo" / "gncnn").iterdir()) == ["1", "2"]


@pytest.mark.e2e
@pytest.mark.slow
def test_denoiser_answers_at_the_input_size(walkthrough: tuple[Path, list[Ran]]) -> None:
    folder, _ = walkthrough
    with Image.open(folder / "clean.png") as clean, Image.open(folder / "noisy.png") as noisy:
        assert clean.format == "PNG" and clean.size == noisy.size
    config = json.loads((folder / "my_repo" / "in_autoencoder" / "1" / "config.json").read_text())
    assert config["weights"]["trained"] is True and config["task"] == "denoising"
