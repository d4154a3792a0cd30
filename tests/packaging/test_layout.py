"""One import package: every module is `normserve.*`, imports go downward only, a wheel holds
`normserve/` and nothing else, and each `normserve` subcommand answers `--help` without extras."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from normserve import __version__

# What each part may import of normserve besides itself. The root package (`normserve`: the
# version) and the torch-free shared modules (`normserve.contract`, `normserve.safe_pickle`,
# `normserve.files`, `normserve.quality`) are below everything; `normserve.cli` is above
# everything, so no part imports it.
ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "service": set(),
    "export": {"models"},
    "evaluation": {"service"},
    # `normserve bench` compares ORT with PyTorch eager when torch is there (bench/raw.py).
    "bench": {"service", "evaluation", "export", "models"},
}
PARTS = ("models", "service", "export", "evaluation", "bench")


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; write normserve.<part>.<module>")
    return names


def _part_of(module: str) -> str | None:
    """'normserve.service.model' -> 'service'; shared modules and outside packages -> None."""
    pieces = module.split(".")
    if pieces[0] in PARTS:
        return f"bare:{pieces[0]}"  # `import service`: the old top-level names must not come back
    if pieces[0] != "normserve" or len(pieces) < 2 or pieces[1] not in (*PARTS, "cli"):
        return None  # outside packages, the root package's version, the shared modules
    return pieces[1]


@pytest.mark.parametrize("part", PARTS)
def test_imports_go_downward_only(repo_root: Path, part: str) -> None:
    wrong = []
    for path in sorted((repo_root / part).rglob("*.py")):
        for module in _imported(path):
            target = _part_of(module)
            if target is None or target == part:
                continue
            if target.startswith("bare:") or target not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(repo_root)} imports {module}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", ["contract", "safe_pickle", "files", "quality", "__init__"])
def test_shared_modules_import_nothing_of_the_parts(repo_root: Path, module: str) -> None:
    imported = _imported(repo_root / "normserve" / f"{module}.py")
    assert not {m for m in imported if m.startswith("normserve")}


def test_tests_and_scripts_use_the_package_name(repo_root: Path) -> None:
    wrong = []
    for folder in ("tests", "scripts"):
        for path in sorted((repo_root / folder).rglob("*.py")):
            wrong += [f"{path} imports {m}" for m in _imported(path) if m.split(".")[0] in PARTS]
    assert not wrong, "\n".join(wrong)


def test_the_links_point_at_the_design_folders(repo_root: Path) -> None:
    for part in PARTS:
        link = repo_root / "normserve" / part
        assert link.is_symlink() and os.readlink(link) == f"../{part}"


@pytest.fixture(scope="module")
def wheel(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(repo_root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("normserve-*.whl")
    return path, result.stdout + result.stderr


@pytest.mark.slow
def test_the_wheel_holds_one_package_and_its_data(wheel: tuple[Path, str]) -> None:
    path, log = wheel
    assert "warning" not in log.lower(), log
    names = zipfile.ZipFile(path).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"normserve", f"normserve-{__version__}.dist-info"}
    for expected in (
        "normserve/cli.py",
        "normserve/contract.py",
        "normserve/service/app.py",
        "normserve/service/routes/v2.py",
        "normserve/service/static/index.html",
        "normserve/models/configs/gncnn.json",
        "normserve/models/weights/gncnn.safetensors",
        "normserve/bench/wrk.lua",
        f"normserve-{__version__}.dist-info/licenses/LICENSE",
    ):
        assert expected in names
    assert not [n for n in names if "teachers/" in n or "__pycache__" in n]


@pytest.mark.slow
def test_an_installed_wheel_imports_as_normserve_only(wheel: tuple[Path, str], tmp_path: Path) -> None:
    """Installed (not editable) beside the dev venv's dependencies: normserve.* imports from the
    wheel's files, and the old generic top-level names are gone."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel[0])],
        check=True,
        timeout=300,
    )
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    code = textwrap.dedent(
        """
        import importlib, json, sys
        import normserve.service.app, normserve.cli
        gone = []
        for name in ("service", "models", "export", "evaluation", "bench"):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                gone.append(name)
        print(json.dumps({"app": normserve.service.app.__file__, "gone": gone,
                          "title": normserve.service.app.create_app.__module__}))
        """
    )
    # -S: no site processing, so the dev venv's editable-install finder (a .pth) is not active.
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{deps}"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = result.stdout.strip().splitlines()[-1]
    assert str(target) in report and '"gone": ["service", "models", "export", "evaluation", "bench"]' in report
    version = subprocess.run(
        [sys.executable, "-S", "-m", "normserve", "--version"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert version.stdout.strip() == f"normserve {__version__}"


# Every extra's modules made unimportable: what a runtime-only install (`pip install -e .`) has.
WITHOUT_EXTRAS = textwrap.dedent(
    """
    import importlib.abc, runpy, sys
    BLOCKED = {"torch", "onnx", "onnxscript", "safetensors", "psutil", "matplotlib", "skimage", "scipy",
               "cv2", "pywt", "tqdm"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Block())
    sys.argv = ["normserve", *sys.argv[1:]]
    runpy.run_module("normserve", run_name="__main__")
    """
)


def _normserve_without_extras(repo_root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS, *argv], cwd=repo_root, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["serve"],
        ["export"],
        ["train"],
        ["train", "classifier"],
        ["train", "denoiser"],
        ["bench"],
        ["eval"],
        ["eval", "classifier"],
        ["eval", "denoiser"],
    ],
    ids=lambda argv: " ".join(argv) or "normserve",
)
def test_help_works_without_extras(repo_root: Path, argv: list[str]) -> None:
    result = _normserve_without_extras(repo_root, *argv, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: normserve")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["train", "classifier", "--data", "d", "--out", "o"], "export,train"),
        (["export", "--model", "gncnn"], "export"),
        (["bench", "--quick"], "bench"),
    ],
    ids=["train", "export", "bench"],
)
def test_a_missing_extra_names_the_install_command(repo_root: Path, argv: list[str], extra: str) -> None:
    result = _normserve_without_extras(repo_root, *argv)
    assert result.returncode == 1
    assert f"pip install -e '.[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_comes_from_one_place(repo_root: Path) -> None:
    from importlib.metadata import version

    from normserve.service.app import create_app
    from normserve.service.settings import Settings

    assert version("normserve") == __version__
    settings = Settings(_env_file=None, model_repository=repo_root / "model_repository")
    assert create_app(settings).version == __version__
    result = subprocess.run(
        [sys.executable, "-m", "normserve", "--version"], cwd=repo_root, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == f"normserve {__version__}"
