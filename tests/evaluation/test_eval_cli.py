"""`normserve eval` is wired into the console command, and the evaluator runs without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from eval_data import RepoFactory, save, smooth_image

from normserve.cli import build_parser
from normserve.cli import main as normserve


def test_normserve_eval_parses_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["eval", "denoiser", "--sigmas", "15,25", "--baselines", "--threads", "1"])
    assert (args.command, args.task, args.sigmas, args.baselines, args.threads) == (
        "eval",
        "denoiser",
        [15.0, 25.0],
        True,
        1,
    )
    assert normserve(["eval", "classifier", "--repository", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "denoiser", "--sigmas", "0"])


@pytest.mark.parametrize(("task", "model"), [("classifier", "gncnn"), ("denoiser", "in_autoencoder")])
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--compare-repository", "{repo}"], "--compare-repository needs --compare VERSION"),
        (["--compare", "99"], "no version '99'"),
    ],
)
def test_a_bad_compare_is_an_error_before_any_data_is_read(
    task: str,
    model: str,
    extra: list[str],
    message: str,
    tmp_path: Path,
    model_repo: RepoFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = model_repo(model)
    args = ["eval", task, "--repository", str(repo), "--data", str(tmp_path / "no-such-data")]
    rc = normserve([*args, "--out", str(tmp_path / "o"), *(e.format(repo=repo) for e in extra)])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "no-such-data" not in err


SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test (import of {name!r})")
            return None


    sys.meta_path.insert(0, BlockTorch())
    from normserve.cli import main

    rc = main(["eval", "denoiser", *sys.argv[1:]])
    loaded = "torch" in sys.modules
    try:
        import torch  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    print("TORCH_LOADED", loaded, "RC", rc, "BLOCK_WORKS", blocked)
    """
)


def test_eval_runs_without_torch(tmp_path: Path, model_repo: RepoFactory, repo_root: Path) -> None:
    repo = model_repo("in_autoencoder")
    save(smooth_image(np.random.default_rng(0), 20, 20), tmp_path / "clean" / "x.png")
    out = tmp_path / "out"
    args = ["--repository", str(repo), "--data", str(tmp_path / "clean"), "--out", str(out)]
    args += ["--sigmas", "25", "--latency-runs", "1", "--latency-size", "16"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], cwd=repo_root, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "TORCH_LOADED False RC 0 BLOCK_WORKS True" in result.stdout  # the block is real, torch never came
    assert json.loads((out / "denoiser.json").read_text())["results"]["images"] == 1
