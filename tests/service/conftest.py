"""Fixtures for the service tests: settings isolated from the environment, real apps over the
committed model repository (lifespan run by `with TestClient(...)`), and writable copies of it.

Every client this module hands out fails the test on a 5xx answer (503 only where a test asks
for it), so "no 5xx anywhere" is checked on every request rather than where someone remembered to.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import shipped
from fastapi.testclient import TestClient

from normserve.service import settings as settings_module
from normserve.service.app import create_app
from normserve.service.settings import Settings

SettingsFactory = Callable[..., Settings]
ClientFactory = Callable[..., TestClient]
ErrorCheck = Callable[..., str]


def _clear_normserve_env(mp: pytest.MonkeyPatch) -> None:
    # A developer's NORMSERVE_* variables would otherwise change limits and paths under the tests.
    for key in list(os.environ):
        if key.startswith("NORMSERVE_"):
            mp.delenv(key)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_normserve_env(monkeypatch)
    # In-process apps leave gRPC off (it would listen on 8001); a test that wants it passes
    # grpc=True with a free grpc_port. Servers started by servers.py run it on a free port.
    monkeypatch.setenv("NORMSERVE_GRPC", "false")


CpuSetter = Callable[..., None]  # the cpus fixture


@pytest.fixture
def cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CpuSetter:
    """`cpus(allowed, quota=None)`: this process may run on CPUs `allowed` (a set, or a count from 0),
    and its cgroup has a CPU quota of `quota` CPUs (None: no limit), whatever the real machine has."""

    def set_cpus(allowed: int | set[int], quota: float | None = None) -> None:
        mask = set(range(allowed)) if isinstance(allowed, int) else set(allowed)
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: mask)
        root = tmp_path / "cgroup"
        root.mkdir(exist_ok=True)
        (root / "cpu.max").write_text("max 100000\n" if quota is None else f"{round(quota * 100_000)} 100000\n")
        monkeypatch.setattr(settings_module, "CGROUP_ROOT", root)

    return set_cpus


def make_settings(repository: Path, **overrides: Any) -> Settings:
    """Settings for a test app: no .env file, the given repository, and explicit overrides."""
    return Settings(_env_file=None, model_repository=repository, **overrides)  # type: ignore[call-arg]


def no_5xx_hook(allow_503: bool = False) -> Callable[[httpx.Response], None]:
    """An httpx response hook that fails the test on a server error (503 optionally allowed)."""

    def hook(response: httpx.Response) -> None:
        if response.status_code >= 500 and not (allow_503 and response.status_code == 503):
            response.read()
            raise AssertionError(
                f"{response.request.method} {response.request.url} answered {response.status_code}: {response.text}"
            )

    return hook


def open_client(stack: ExitStack, settings: Settings, *, allow_503: bool = False) -> TestClient:
    # raise_server_exceptions=False: a crash must show up as the 500 a real client would get,
    # which the hook then reports with the body, instead of as a traceback from inside the app.
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    stack.enter_context(client)  # runs the lifespan: loads the models, and stops them on exit
    client.event_hooks = {"request": [], "response": [no_5xx_hook(allow_503)]}
    return client


@pytest.fixture(scope="session")
def client(committed_model_repository: Path) -> Iterator[TestClient]:
    """One app over the committed repository, shared by the read-only tests: default settings but
    for the version policy, `all` (the default is `latest:1`), since these tests reach every
    shipped version."""
    with pytest.MonkeyPatch.context() as mp, ExitStack() as stack:
        _clear_normserve_env(mp)
        yield open_client(stack, make_settings(committed_model_repository, version_policy="all"))


@pytest.fixture
def settings_factory(committed_model_repository: Path) -> SettingsFactory:
    """`settings_factory(repository=None, **overrides)`: Settings over the committed or a given repository."""

    def factory(repository: Path | None = None, **overrides: Any) -> Settings:
        return make_settings(repository or committed_model_repository, **overrides)

    return factory


@pytest.fixture
def app_client(settings_factory: SettingsFactory) -> Iterator[ClientFactory]:
    """`app_client(repository=None, allow_503=False, **settings)`: a started app, stopped at teardown."""
    with ExitStack() as stack:

        def factory(repository: Path | None = None, *, allow_503: bool = False, **overrides: Any) -> TestClient:
            return open_client(stack, settings_factory(repository, **overrides), allow_503=allow_503)

        yield factory


@pytest.fixture
def repo_copy(tmp_path: Path, committed_model_repository: Path) -> Path:
    """A writable copy of the committed model repository, for tests that break or extend it."""
    dest = tmp_path / "model_repository"
    shutil.copytree(committed_model_repository, dest)
    return dest


@pytest.fixture(scope="session")
def gncnn_config(committed_model_repository: Path) -> dict[str, Any]:
    """The classifier's config.json as plain JSON (read directly, not through the service's schema)."""
    return shipped.config("gncnn", repository=committed_model_repository)


@pytest.fixture(scope="session")
def denoiser_config(committed_model_repository: Path) -> dict[str, Any]:
    return shipped.config("in_autoencoder", repository=committed_model_repository)


@pytest.fixture(scope="session")
def expect_error() -> ErrorCheck:
    """`expect_error(response, status, *fragments)`: the response is the service's JSON error
    `{"error": "..."}` with that status and a message naming every fragment (case-insensitive).
    Returns the message."""

    def check(response: httpx.Response, status: int, *fragments: str) -> str:
        assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
        assert response.headers["content-type"].startswith("application/json"), response.headers
        body = response.json()
        assert set(body) == {"error"}, body
        message = body["error"]
        assert isinstance(message, str) and message.strip(), body
        for fragment in fragments:
            assert fragment.lower() in message.lower(), f"{fragment!r} not in error message {message!r}"
        return message

    return check
