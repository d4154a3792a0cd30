"""Version policies (service/versions.py) on their own, and read from the environment."""

from __future__ import annotations

import pytest

from normserve.service.settings import Settings
from normserve.service.versions import VersionPolicy


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("all", VersionPolicy()),
        (" ALL ", VersionPolicy()),
        ("latest:1", VersionPolicy("latest", num_versions=1)),
        ("latest: 3", VersionPolicy("latest", num_versions=3)),
        ("specific:6", VersionPolicy("specific", versions=(6,))),
        ("specific:10, 2,6,6", VersionPolicy("specific", versions=(2, 6, 10))),
    ],
)
def test_parse(text: str, policy: VersionPolicy) -> None:
    assert VersionPolicy.parse(text) == policy
    assert VersionPolicy.parse(str(policy)) == policy  # str() writes what parse() reads


@pytest.mark.parametrize(
    "text",
    [
        "",
        "latest",
        "latest:",
        "latest:0",
        "latest:-1",
        "latest:x",
        "specific:",
        "specific:a",
        "specific:1,,2",
        "all:1",
        "newest",
    ],
)
def test_bad_policies_name_the_syntax(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not 'all', 'latest:N' \(N >= 1\) or 'specific:V\[,V\.\.\.\]'"):
        VersionPolicy.parse(text)


ON_DISK = ["10", "2", "9", "1"]  # as a directory listing may order them


@pytest.mark.parametrize(
    ("text", "selected", "triton"),
    [
        ("all", ["1", "2", "9", "10"], {"all": {}}),
        ("latest:1", ["10"], {"latest": {"num_versions": 1}}),
        ("latest:2", ["9", "10"], {"latest": {"num_versions": 2}}),  # by number: "9" < "10"
        ("latest:7", ["1", "2", "9", "10"], {"latest": {"num_versions": 7}}),  # fewer on disk: all of them
        ("specific:10,1", ["1", "10"], {"specific": {"versions": [1, 10]}}),
    ],
)
def test_select_in_numeric_order(text: str, selected: list[str], triton: dict[str, object]) -> None:
    policy = VersionPolicy.parse(text)
    assert policy.select(ON_DISK) == selected
    assert policy.triton() == triton


def test_specific_versions_must_exist() -> None:
    with pytest.raises(
        ValueError, match=r"names versions \[3, 11\] that are not in the repository \(available: \[1, 2, 9, 10\]\)"
    ):
        VersionPolicy.parse("specific:2,3,11").select(ON_DISK)


def test_policies_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMSERVE_VERSION_POLICY", "latest:2")
    monkeypatch.setenv("NORMSERVE_VERSION_POLICIES", '{"gncnn": "specific:5,6"}')
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.policy_for("gncnn") == VersionPolicy("specific", versions=(5, 6))
    assert settings.policy_for("in_autoencoder") == VersionPolicy("latest", num_versions=2)
    assert Settings(_env_file=None, version_policy="all").policy_for("gncnn") == VersionPolicy(
        "specific", versions=(5, 6)
    )  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("variable", "value"),
    [("NORMSERVE_VERSION_POLICY", "newest"), ("NORMSERVE_VERSION_POLICIES", '{"gncnn": "latest:0"}')],
)
def test_bad_policy_in_the_environment_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match="is not 'all', 'latest:N'"):
        Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("value", "expected"), [("", {}), ("  ", {}), ('{"gncnn": "all"}', {"gncnn": VersionPolicy()})]
)
def test_per_model_policies_may_be_empty(monkeypatch: pytest.MonkeyPatch, value: str, expected: object) -> None:
    # docker-compose passes the variable through empty when it is not set.
    monkeypatch.setenv("NORMSERVE_VERSION_POLICIES", value)
    assert Settings(_env_file=None).version_policies == expected  # type: ignore[call-arg]


def test_per_model_policies_must_be_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMSERVE_VERSION_POLICIES", "gncnn=latest:2")
    with pytest.raises(ValueError, match="version_policies"):
        Settings(_env_file=None)  # type: ignore[call-arg]
