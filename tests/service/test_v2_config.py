"""`GET /v2/models/{m}[/versions/{v}]/config`: Triton's model-config JSON, built from config.json
and the batching settings (tritonclient's `get_model_config` is tested against the real server in
test_v2_infer.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import shipped
from conftest import ClientFactory, ErrorCheck
from fastapi.testclient import TestClient

from normserve.service.state import server_state


def _tensor(name: str, dims: list[int], **extra: Any) -> dict[str, Any]:
    return {"name": name, "data_type": "TYPE_FP32", "dims": dims, "is_shape_tensor": False, **extra}


GNCNN_CONFIG = {
    "name": "gncnn",
    "platform": "onnxruntime_onnx",
    "backend": "onnxruntime",
    "version_policy": {"all": {}},
    "max_batch_size": 32,
    "input": [_tensor("image", [3, -1, -1], format="FORMAT_NCHW", optional=False)],
    "output": [
        _tensor("logits", [10], label_filename=""),
        _tensor("p3", [64, -1, -1], label_filename=""),
        _tensor("p4", [128, -1, -1], label_filename=""),
        _tensor("p5", [256, -1, -1], label_filename=""),
    ],
    "dynamic_batching": {
        "preferred_batch_size": [],
        "max_queue_delay_microseconds": 0,
        "preserve_ordering": False,
        "priority_levels": 0,
        "default_priority_level": 0,
        "default_queue_policy": {
            "timeout_action": "REJECT",
            "default_timeout_microseconds": 30_000_000,
            "allow_timeout_override": False,
            "max_queue_size": 64,
        },
    },
    # count: worker processes x model instances, which by default depend on the CPUs (test_settings).
    "instance_group": [{"name": "gncnn", "kind": "KIND_CPU", "count": "per settings", "gpus": []}],
    "default_model_filename": "model.onnx",
    "parameters": "per version",
}


@pytest.mark.parametrize("path", ["/v2/models/gncnn/config", "/v2/models/gncnn/versions/1/config"])
def test_config_has_tritons_shape_with_the_default_settings(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    settings = server_state(client.app).settings
    group = {**GNCNN_CONFIG["instance_group"][0], "count": settings.workers * settings.instances()}
    version = path.split("/versions/")[1].split("/")[0] if "/versions/" in path else None
    quantization = shipped.config("gncnn", version).get("quantization")
    precision = {"precision": {"string_value": quantization["mode"] if quantization else "fp32"}}  # from disk
    # the classifier resizes its images, so its input also takes encoded image files (BYTES)
    parameters = {**precision, "encoded_image_inputs": {"string_value": "image"}}
    assert r.json() == {**GNCNN_CONFIG, "instance_group": [group], "parameters": parameters}


def test_denoiser_config_drops_only_the_batch_dimension(client: TestClient) -> None:
    config = client.get("/v2/models/in_autoencoder/config").json()
    assert config["input"][0]["dims"] == [3, -1, -1] and config["input"][0]["format"] == "FORMAT_NCHW"
    assert [(o["name"], o["dims"]) for o in config["output"]] == [("reconstruction", [3, -1, -1])]
    assert config["max_batch_size"] == 32


def test_config_follows_the_settings_and_the_models_own_override(app_client: ClientFactory, repo_copy: Path) -> None:
    path = repo_copy / "in_autoencoder" / shipped.DENOISER / "config.json"
    raw = json.loads(path.read_text())
    raw["dynamic_batching"] = {"max_batch_size": 4, "max_queue_delay_ms": 0.5}
    path.write_text(json.dumps(raw))
    client = app_client(
        repo_copy,
        max_batch_size=8,
        max_queue_delay_ms=2.5,
        max_queue_size=16,
        request_timeout_s=5,
        workers=3,
        model_instances=2,
    )
    gncnn = client.get("/v2/models/gncnn/config").json()
    assert gncnn["max_batch_size"] == 8
    assert gncnn["dynamic_batching"]["max_queue_delay_microseconds"] == 2500
    assert gncnn["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 16
    assert gncnn["dynamic_batching"]["default_queue_policy"]["default_timeout_microseconds"] == 5_000_000
    assert gncnn["instance_group"][0]["count"] == 6  # 3 workers x 2 instances
    denoiser = client.get(f"/v2/models/in_autoencoder/versions/{shipped.DENOISER}/config").json()
    assert denoiser["max_batch_size"] == 4
    assert denoiser["dynamic_batching"]["max_queue_delay_microseconds"] == 500
    assert denoiser["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 16  # not overridden


def test_bad_batching_override_makes_the_model_unavailable_with_the_reason(
    app_client: ClientFactory, repo_copy: Path, expect_error: ErrorCheck
) -> None:
    path = repo_copy / "gncnn" / shipped.GNCNN / "config.json"
    raw = json.loads(path.read_text())
    raw["dynamic_batching"] = {"max_batch_size": 0, "max_que_size": 3}
    path.write_text(json.dumps(raw))
    client = app_client(repo_copy, allow_503=True, strict_readiness=False)
    ready = client.get("/v2/models/gncnn/ready").json()
    assert ready["state"] == "UNAVAILABLE"
    assert "max_batch_size" in ready["reason"] and "max_que_size" in ready["reason"]
    expect_error(client.get("/v2/models/gncnn/config"), 503, "not ready")
    assert client.get("/v2/models/in_autoencoder/config").status_code == 200


@pytest.mark.parametrize(
    ("path", "fragment"),
    [("/v2/models/nope/config", "'nope' not found"), ("/v2/models/gncnn/versions/99/config", "no version '99'")],
)
def test_unknown_model_or_version_is_404(
    client: TestClient, expect_error: ErrorCheck, path: str, fragment: str
) -> None:
    expect_error(client.get(path), 404, fragment)
