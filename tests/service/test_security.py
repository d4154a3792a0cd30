"""Security: the optional API key on the routes that run a model, CORS closed by default, and no
unpickling anywhere a user's bytes could reach."""

from __future__ import annotations

import ast
import hmac
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ClientFactory, ErrorCheck, SettingsFactory
from fastapi.testclient import TestClient
from images import image_bytes
from pydantic import ValidationError
from shipped import GNCNN

from normserve.service import security

KEY = "k3y-for-tests_0123456789"
PNG = {"content-type": "image/png"}
ORIGIN = "https://app.example"

# Every route that runs a model, with a request it would answer 200 with the right key.
V2_IMAGE = {"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * (3 * 32 * 32)}
INFERENCE: list[tuple[str, dict[str, Any]]] = [
    ("/classify", {"content": image_bytes(32, 32), "headers": PNG}),
    ("/features", {"content": image_bytes(32, 32), "headers": PNG}),
    ("/reconstruct", {"content": image_bytes(24, 20), "headers": PNG}),
    ("/v2/models/gncnn/infer", {"json": {"inputs": [V2_IMAGE]}}),
    (f"/v2/models/gncnn/versions/{GNCNN}/infer", {"json": {"inputs": [V2_IMAGE]}}),
]
# Open whatever the key: probes, scrapers, docs, the demo page and model metadata.
OPEN = [
    "/",
    "/static/app.js",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models",
    "/v2/models/gncnn",
    "/v2/models/gncnn/ready",
    f"/v2/models/gncnn/versions/{GNCNN}",
    "/metrics",
    "/docs",
    "/openapi.json",
]


@pytest.fixture
def keyed(app_client: ClientFactory) -> TestClient:
    return app_client(api_key=KEY)


def _post(client: TestClient, path: str, request: dict[str, Any], auth: str | None) -> Any:
    headers = dict(request.get("headers", {}))
    if auth is not None:
        headers["authorization"] = auth
    return client.post(path, **{**request, "headers": headers})


@pytest.mark.parametrize(("path", "request_"), INFERENCE, ids=[p for p, _ in INFERENCE])
def test_inference_needs_the_key(
    keyed: TestClient, expect_error: ErrorCheck, path: str, request_: dict[str, Any]
) -> None:
    missing = _post(keyed, path, request_, None)
    expect_error(missing, 401, "API key", "Authorization: Bearer")
    assert missing.headers["www-authenticate"] == 'Bearer realm="normserve"'

    for wrong in (f"Bearer {KEY}x", "Bearer " + KEY[:-1], f"Basic {KEY}", KEY, "Bearer"):
        response = _post(keyed, path, request_, wrong)
        message = expect_error(response, 401)
        assert KEY not in message  # nothing of the key comes back
        assert response.headers["www-authenticate"].startswith("Bearer")

    wrong = _post(keyed, path, request_, "Bearer not-the-key")
    assert wrong.headers["www-authenticate"] == 'Bearer realm="normserve", error="invalid_token"'

    ok = _post(keyed, path, request_, f"Bearer {KEY}")
    assert ok.status_code == 200, ok.text
    assert _post(keyed, path, request_, f"bearer {KEY}").status_code == 200  # the scheme is case-insensitive


@pytest.mark.parametrize("path", OPEN)
def test_health_metadata_metrics_docs_and_page_stay_open(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200, path


def test_without_a_key_everything_is_open(client: TestClient) -> None:
    for path, request_ in INFERENCE:
        assert _post(client, path, request_, None).status_code == 200, path
    # A key sent to a server without one is ignored, not an error.
    assert _post(client, *INFERENCE[0], "Bearer whatever").status_code == 200


def test_every_operation_that_runs_a_model_is_protected(keyed: TestClient) -> None:
    """Over the schema, so a route added later is covered: POST operations (they run a model, or
    list the repository: Triton's restricted model-repository API) declare the bearer scheme and answer 401 without the key; the others declare none and never
    answer 401."""
    spec = keyed.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": security.bearer.model.description,
    }
    fill = {"name": "gncnn", "version": "1"}
    protected = []
    for template, operations in spec["paths"].items():
        path = template.format(**fill)
        for method, operation in operations.items():
            secured = operation.get("security") == [{"HTTPBearer": []}]
            assert secured == (method == "post"), (method, template)
            if secured:
                assert "401" in operation["responses"], template
                assert keyed.request(method, path).status_code == 401, template
                protected.append(template)
            else:
                assert keyed.request(method, path).status_code != 401, template
    assert set(protected) >= {p for p, _ in INFERENCE if "gncnn" not in p} | {
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
        "/v2/repository/index",
    }


def test_key_is_compared_in_constant_time(keyed: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    path, request_ = INFERENCE[0]
    assert _post(keyed, path, request_, "Bearer nope").status_code == 401
    assert _post(keyed, path, request_, f"Bearer {KEY}").status_code == 200
    assert calls == [(b"nope", KEY.encode()), (KEY.encode(), KEY.encode())]


def test_key_setting(settings_factory: SettingsFactory) -> None:
    assert settings_factory().api_key is None
    assert settings_factory(api_key="").api_key is None  # empty = no key (compose passes "" for unset)
    key = settings_factory(api_key=KEY).api_key
    assert key is not None and key.get_secret_value() == KEY
    assert KEY not in repr(settings_factory(api_key=KEY))  # never printed
    with pytest.raises(ValidationError, match="whitespace"):
        settings_factory(api_key=f" {KEY}\n")


# -- CORS -----------------------------------------------------------------------------------------
def _preflight(client: TestClient, origin: str) -> Any:
    return client.options(
        "/classify",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )


def test_cors_is_closed_by_default(client: TestClient) -> None:
    preflight = _preflight(client, ORIGIN)
    assert "access-control-allow-origin" not in preflight.headers
    simple = client.get("/v2/health/live", headers={"origin": ORIGIN})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_cors_allows_only_the_configured_origins(app_client: ClientFactory, settings_factory: SettingsFactory) -> None:
    assert settings_factory(cors_origins="https://a.example, http://b.example:8080").cors_origins == [
        "https://a.example",
        "http://b.example:8080",
    ]
    client = app_client(cors_origins=[ORIGIN], api_key=KEY)
    preflight = _preflight(client, ORIGIN)
    assert preflight.status_code == 200  # answered by the middleware, before the key is checked
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "POST" in preflight.headers["access-control-allow-methods"]
    refused = _preflight(client, "https://evil.example")
    assert refused.status_code == 400 and "Disallowed CORS origin" in refused.json()["error"]  # JSON like any error

    path, request_ = INFERENCE[0]
    request_ = {**request_, "headers": {**request_["headers"], "origin": ORIGIN}}
    ok = _post(client, path, request_, f"Bearer {KEY}")
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
    denied = _post(client, path, request_, None)  # a browser can read why it failed
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    other = client.get("/v2/health/live", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# -- nothing is unpickled ---------------------------------------------------------------------------
def _python_files(repo_root: Path, *packages: str) -> list[Path]:
    return [p for pkg in packages for p in sorted((repo_root / pkg).rglob("*.py"))]


def _keyword(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def test_the_service_never_unpickles(repo_root: Path) -> None:
    """service/ (what handles requests) imports no pickle-based loader and loads nothing with
    pickle; np.load anywhere must say allow_pickle=False and torch.load weights_only=True."""
    unsafe_modules = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}
    problems = []
    for path in _python_files(repo_root, "service"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                problems += [f"{path}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in unsafe_modules]
    for path in _python_files(repo_root, "service", "models", "export", "scripts"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = ast.unparse(node.func.value)
            if node.func.attr == "load" and owner in ("np", "numpy") and _keyword(node, "allow_pickle") is not False:
                problems.append(f"{path}:{node.lineno} np.load without allow_pickle=False")
            if node.func.attr == "load" and owner == "torch" and _keyword(node, "weights_only") is not True:
                problems.append(f"{path}:{node.lineno} torch.load without weights_only=True")
            if path.is_relative_to(repo_root / "service") and owner == "torch":
                problems.append(f"{path}:{node.lineno} uses torch")
    assert not problems, "\n".join(problems)


def test_weights_and_models_are_not_pickles(repo_root: Path) -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=True).stdout
    files = tracked.split()
    pickled = [
        f for f in files if f.rsplit(".", 1)[-1] in {"pt", "pth", "pkl", "pickle", "ckpt", "npy", "npz", "joblib"}
    ]
    assert not pickled, pickled
    weights = [f for f in files if f.startswith("models/weights/")]
    assert weights and all(f.endswith(".safetensors") for f in weights), weights
    teachers = [f for f in files if f.startswith("models/teachers/")]  # run folders kept for distillation
    assert all(f.endswith(("/weights.safetensors", "/config.json")) for f in teachers), teachers
    served = [f for f in files if f.startswith("model_repository/")]
    assert served and all(f.endswith(("/model.onnx", "/config.json")) for f in served), served
