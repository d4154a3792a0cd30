"""int8 export: a QDQ graph made from the shipped classifier weights, checked against fp32, served."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from normserve.cli import main as normserve
from normserve.export.cli import verify
from normserve.export.onnx_export import ExportError, check_graph
from normserve.export.quantize import Int8Request, check_int8, check_int8_weights, cifar_calibration_split
from normserve.export.repository import ExportResult, export_to_repository
from normserve.models.registry import ModelSpec, build_model
from normserve.models.weights import load_spec, shipped_spec_path, shipped_weights_path
from normserve.service.app import create_app
from normserve.service.settings import Settings


def photo_like(n: int, seed: int) -> np.ndarray:
    """Smooth colour blobs plus grain: far from noise, so the classifier's top-1 is not a tie."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 3, 4, 4), dtype=np.float32)
    x = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3) * 0.7 + 0.3 * rng.random((n, 3, 32, 32), dtype=np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


# The shipped classifier on these images agrees with itself in int8 well above this (and a random
# graph would not); 0.99 is the CLI's bar for real CIFAR images.
MIN_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    request = Int8Request(photo_like(192, 0), photo_like(400, 1), "synthetic test images", MIN_AGREEMENT)
    return export_to_repository(
        load_spec(shipped_spec_path("gncnn")),
        tmp_path_factory.mktemp("repo"),
        weights=shipped_weights_path("gncnn"),
        int8=request,
    )


def test_int8_graph_quantizes_every_conv_and_keeps_the_contract(int8_export: ExportResult) -> None:
    proto = onnx.load(str(int8_export.directory / "model.onnx"))
    ops = check_graph("gncnn", proto)  # checker, opset 18, InstanceNormalization, no BN/GN
    assert ops == int8_export.config.ops
    assert ops["QuantizeLinear"] >= ops["Conv"] and ops["DequantizeLinear"] >= 2 * ops["Conv"]
    model = build_model(load_spec(shipped_spec_path("gncnn")), shipped_weights_path("gncnn"))
    assert check_int8_weights(proto, model) == ops["Conv"]  # each conv's weights: int8, from these weights
    assert not list(int8_export.directory.glob("*fp32*"))  # the fp32 intermediate is not left behind


def test_int8_report_is_recorded(int8_export: ExportResult) -> None:
    q = int8_export.config.quantization
    assert q is not None
    assert q["mode"] == "int8" and q["source"] == "synthetic test images"
    assert (q["calibration_images"], q["check_images"]) == (192, 400)
    assert MIN_AGREEMENT <= q["top1_agreement"] <= 1.0 and q["min_top1_agreement"] == MIN_AGREEMENT
    assert 0.0 < q["max_abs_logit_diff"] < 5.0  # quantized: not bit-exact, but close
    assert int8_export.config.parity["max_abs_diff"] <= 1e-4  # the fp32 graph it came from was exact


def test_int8_graph_is_served(int8_export: ExportResult) -> None:
    settings = Settings(model_repository=int8_export.directory.parents[1], strict_readiness=False)
    image = io.BytesIO()
    Image.fromarray((photo_like(1, 5)[0].transpose(1, 2, 0) * 255).astype(np.uint8)).save(image, format="PNG")
    with TestClient(create_app(settings)) as client:
        r = client.post("/classify?top_k=10", content=image.getvalue(), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        assert abs(sum(p["probability"] for p in r.json()["predictions"]) - 1.0) < 1e-4
        features = client.post("/features", content=image.getvalue(), headers={"content-type": "image/png"})
        assert features.status_code == 200, features.text


def test_too_little_agreement_fails_the_export(tmp_path: Path) -> None:
    # A graph quantized from one model is checked against another model's fp32 graph: they disagree.
    spec = load_spec(shipped_spec_path("gncnn"))
    weights = shipped_weights_path("gncnn")
    good = export_to_repository(
        spec, tmp_path / "a", weights=weights, int8=Int8Request(photo_like(64, 0), photo_like(64, 1), "synthetic", 0.0)
    )
    other = export_to_repository(spec, tmp_path / "b", random_seed=3, labels=good.config.labels)
    with pytest.raises(ExportError, match="agrees with the fp32 one on"):
        check_int8(other.directory / "model.onnx", good.directory / "model.onnx", photo_like(200, 2))
    # And through the exporter: an impossible bar leaves no version behind.
    with pytest.raises(ExportError, match="agrees with the fp32 one on"):
        export_to_repository(
            spec,
            tmp_path / "c",
            weights=weights,
            int8=Int8Request(photo_like(64, 0), photo_like(64, 1), "synthetic", 1.01),
        )
    assert not (tmp_path / "c" / "gncnn").exists()


def test_verify_checks_an_int8_version_by_its_weights(int8_export: ExportResult, tmp_path: Path) -> None:
    repo = int8_export.directory.parents[1]
    assert verify(repo, ["gncnn"]) == []
    proto = onnx.load(str(int8_export.directory / "model.onnx"))
    for init in proto.graph.initializer:  # flip one int8 weight far from the shipped value
        if init.name.endswith("_quantized"):
            w = onnx.numpy_helper.to_array(init).copy()
            w.flat[0] = 127 if w.flat[0] < 0 else -128
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
            break
    model = build_model(load_spec(shipped_spec_path("gncnn")), shipped_weights_path("gncnn"))
    with pytest.raises(ExportError, match="rounded to its scale"):
        check_int8_weights(proto, model)


def test_int8_is_for_classifiers_only(tmp_path: Path) -> None:
    request = Int8Request(photo_like(8, 0), photo_like(8, 1), "synthetic")
    with pytest.raises(ValueError, match="classifiers only"):
        export_to_repository(ModelSpec.default("in_autoencoder"), tmp_path, random_seed=0, int8=request)
    with pytest.raises(SystemExit, match="--model gncnn"):
        normserve(["export", "--int8", "data.zip", "--repository", str(tmp_path)])


def test_calibration_split_reads_a_cifar_layout_and_is_disjoint(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as zf:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                for i in range(6):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                    zf.writestr(f"{split}/{cls}/{i}.png", buf.getvalue())
    calibration, check = cifar_calibration_split(tmp_path / "data.zip", 5, 7, cache_dir=None)
    assert calibration.shape == (5, 3, 32, 32) and check.shape == (7, 3, 32, 32)
    assert calibration.dtype == np.float32 and calibration.min() >= 0.0 and calibration.max() <= 1.0
    pool = np.concatenate([calibration, check]).reshape(12, -1)
    assert len({row.tobytes() for row in pool}) == 12  # 12 distinct training images: disjoint sets
    with pytest.raises(ValueError, match="training images"):
        cifar_calibration_split(tmp_path / "data.zip", 10, 10, cache_dir=None)
