"""Property-based API fuzzing with schemathesis against the app's own `/openapi.json`.

The real app runs in process with its lifespan (the committed models load). Every operation in
the schema, whatever routes exist, gets a bounded number of generated requests, valid and
invalid (wrong types, missing fields, odd bodies, other HTTP methods), and every answer must:

- not be a server error (5xx),
- have a status the schema declares for that operation,
- have a Content-Type the schema declares for that status,
- have a body that validates against the declared schema (errors included: `{"error": "..."}`).

Path parameters named `name` / `version` are half of the time replaced by a model (and one of its
versions) that exists, so requests get past the 404 and into the routes' real work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from normserve.service.app import create_app
from normserve.service.settings import Settings

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
MAX_EXAMPLES = 40  # per operation: the module takes ~20-40 s on two busy cores
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# name -> versions, as committed
MODELS = {
    m.name: sorted(v.name for v in m.iterdir() if v.name.isdigit()) for m in sorted(REPOSITORY.iterdir()) if m.is_dir()
}


def _app_settings() -> Settings:
    # Built at import (schemathesis collects one test per operation from the loaded schema), so
    # the developer's NORMSERVE_* variables are cleared here rather than by the conftest fixture.
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("NORMSERVE_")]:
            mp.delenv(key)
        return Settings(_env_file=None, model_repository=REPOSITORY, access_log=False)  # type: ignore[call-arg]


# Loading the schema runs the app's lifespan (schemathesis keeps it running for the session).
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_app_settings()))


@schema.hook
def flatmap_path_parameters(
    context: Any, path_parameters: dict[str, Any] | None
) -> st.SearchStrategy[dict[str, Any] | None]:
    if not path_parameters or "name" not in path_parameters:
        return st.just(path_parameters)

    def real(name: str) -> st.SearchStrategy[dict[str, Any]]:
        chosen: dict[str, st.SearchStrategy[Any]] = {"name": st.just(name)}
        if "version" in path_parameters:
            chosen["version"] = st.sampled_from(MODELS[name])
        return st.fixed_dictionaries(chosen).map(lambda r: {**path_parameters, **r})

    return st.one_of(st.just(path_parameters), st.sampled_from(sorted(MODELS)).flatmap(real))


def test_the_repository_has_models() -> None:
    assert MODELS and all(MODELS.values()), MODELS


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)
