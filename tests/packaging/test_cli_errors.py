"""A user's mistake on any `normserve` subcommand ends in one `normserve <command>: error: ...` line
naming what to change, never in a traceback. Each case calls the real `main` in process and
expects SystemExit with that message (any other exception would be the traceback a user sees)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from normserve.cli import main as normserve

# (name, argv with {tmp} and {repo} placeholders, environment, fragments the message names)
CASES: list[tuple[str, list[str], dict[str, str], tuple[str, ...]]] = [
    ("serve-no-repository", ["serve", "--model-repository", "{tmp}/nope"], {}, ("{tmp}/nope", "--model-repository")),
    ("serve-bad-setting", ["serve"], {"NORMSERVE_MAX_BATCH_SIZE": "many"}, ("NORMSERVE_MAX_BATCH_SIZE", "integer")),
    ("export-no-weights", ["export", "--model", "gncnn", "--weights", "{tmp}/w.safetensors"], {}, ("--weights",)),
    (
        "export-not-safetensors",
        ["export", "--model", "gncnn", "--weights", "{tmp}/notes.txt"],
        {},
        ("--weights", "not a safetensors"),
    ),
    (
        "export-bad-config",
        ["export", "--model", "gncnn", "--config", "{tmp}/notes.txt", "--random-init"],
        {},
        ("--config",),
    ),
    (
        "export-wrong-kind",
        ["export", "--model", "in_autoencoder", "--config", "{repo}/models/configs/gncnn.json", "--random-init"],
        {},
        ("--model gncnn",),
    ),
    ("train-no-data", ["train", "classifier", "--data", "{tmp}/nope", "--out", "{tmp}/run"], {}, ("{tmp}/nope",)),
    (
        "train-no-test-split",
        ["train", "classifier", "--data", "{tmp}/train_only", "--out", "{tmp}/run"],
        {},
        ("test/<class>/",),
    ),
    (
        "train-not-a-data-folder",
        ["train", "classifier", "--data", "{tmp}/data/train", "--out", "{tmp}/run"],
        {},
        ("train/<class>/",),
    ),
    (
        "train-bad-model",
        ["train", "classifier", "--data", "{tmp}/data", "--out", "{tmp}/run", "--model", '{"widths": 3}'],
        {},
        ("--model", "widths"),
    ),
    (
        "train-bad-init",
        ["train", "classifier", "--data", "{tmp}/data", "--out", "{tmp}/run", "--init-from", "{tmp}/notes.txt"],
        {},
        ("--init-from",),
    ),
    (
        "train-denoiser-small-images",
        ["train", "denoiser", "--data", "{tmp}/data/train/cat", "--out", "{tmp}/run"],
        {},
        ("--patch-size",),
    ),
]


@pytest.fixture
def user_files(tmp_path: Path) -> Path:
    """A text file where weights or a config are expected, and a tiny image-folder data set."""
    from PIL import Image

    (tmp_path / "notes.txt").write_text("not weights, not JSON\n")
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 30), (200, 40, 40) if cls == "cat" else (40, 40, 200)).save(folder / "a.png")
    shutil.copytree(tmp_path / "data" / "train", tmp_path / "train_only" / "train")
    return tmp_path


@pytest.mark.parametrize(("name", "argv", "env", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_a_user_mistake_is_one_line_naming_the_fix(
    name: str,
    argv: list[str],
    env: dict[str, str],
    fragments: tuple[str, ...],
    user_files: Path,
    repo_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from normserve.service.settings import get_settings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(user_files)).replace("{repo}", str(repo_root))

    try:
        with pytest.raises(SystemExit) as stop:
            normserve([fill(a) for a in argv])
    finally:
        get_settings.cache_clear()
    code = stop.value.code
    # sys.exit("message") (or an error code after a printed message), never a traceback.
    message = code if isinstance(code, str) else capsys.readouterr().err
    assert code not in (0, None), name
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0], lines
    assert "Traceback" not in str(message)
    for fragment in fragments:
        assert fill(fragment) in lines[0], (fragment, lines[0])


def test_eval_returns_an_error_code_rather_than_exiting(user_files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`normserve eval` reports through its return code; the console script exits with it."""
    assert normserve(["eval", "classifier", "--repository", str(user_files / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normserve eval: error:") and "Traceback" not in err
    assert str(user_files / "nope") in err


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--port", "eighty"],
        ["export", "--tta", "sideways"],
        ["train", "classifier", "--out", "runs/x"],
        ["train", "regressor"],
        ["bench", "--concurrency", "many"],
        ["eval", "classifier", "--threads", "0"],
    ],
    ids=lambda argv: "-".join(argv[:2]),
)
def test_a_malformed_command_line_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's answer for every subcommand: usage and one error line, exit status 2."""
    with pytest.raises(SystemExit) as stop:
        normserve(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert err.startswith("usage: normserve") and err.strip().splitlines()[-1].startswith("normserve"), err
