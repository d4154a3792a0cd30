"""Export to ONNX opset 18: graph checks, op contract, parity with PyTorch, repository entries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from normserve.cli import main as normserve
from normserve.contract import ModelConfigFile
from normserve.export.cli import spec_and_labels, verify
from normserve.export.onnx_export import (
    PARITY_TOLERANCE,
    ExportError,
    check_graph,
    check_parity,
    export_onnx,
    op_counts,
)
from normserve.export.repository import ExportResult, export_to_repository
from normserve.models import GNCNN, ModelSpec, build_model
from normserve.models.weights import WeightsInfo, load_spec, save_weights, shipped_spec_path

REPO_ROOT = Path(__file__).resolve().parents[2]
LABELS = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportResult]:
    """Both shipped model configs, random-init, exported once for the module."""
    repo = tmp_path_factory.mktemp("repo")
    return {
        kind: export_to_repository(
            load_spec(shipped_spec_path(kind)), repo, random_seed=1, labels=LABELS if kind == "gncnn" else None
        )
        for kind in ("gncnn", "in_autoencoder")
    }


def _proto(result: ExportResult) -> onnx.ModelProto:
    return onnx.load(str(result.directory / "model.onnx"))


@pytest.mark.parametrize("kind", ["gncnn", "in_autoencoder"])
def test_graph_passes_full_checker_at_opset_18(exported: dict[str, ExportResult], kind: str) -> None:
    proto = _proto(exported[kind])
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == 18


@pytest.mark.parametrize("kind", ["gncnn", "in_autoencoder"])
def test_batch_height_width_are_dynamic(exported: dict[str, ExportResult], kind: str) -> None:
    cfg = exported[kind].config
    assert cfg.inputs[0].name == "image" and cfg.inputs[0].shape == [-1, 3, -1, -1]
    assert all(o.shape[0] == -1 for o in cfg.outputs)


def test_autoencoder_graph_uses_instance_statistics(exported: dict[str, ExportResult]) -> None:
    ops = {n.op_type for n in _proto(exported["in_autoencoder"]).graph.node}
    assert "InstanceNormalization" in ops
    assert "BatchNormalization" not in ops


def test_groupnorm_is_lowered_to_instance_normalization(exported: dict[str, ExportResult]) -> None:
    proto = _proto(exported["gncnn"])
    ops = [n.op_type for n in proto.graph.node]
    assert "GroupNormalization" not in ops and "BatchNormalization" not in ops
    # Reshape -> InstanceNormalization -> Reshape -> Mul -> Add, once per GroupNorm layer.
    n_gn = sum(isinstance(m, nn.GroupNorm) for m in build_model(load_spec(shipped_spec_path("gncnn"))).modules())
    assert ops.count("InstanceNormalization") == n_gn
    assert ops.count("Reshape") >= 2 * n_gn
    assert exported["gncnn"].config.ops == dict(sorted({o: ops.count(o) for o in set(ops)}.items()))


def _graph_with(ops: list[str]) -> onnx.ModelProto:
    """A valid opset-18 graph chaining the given per-channel norm ops on a (1, 3, 4, 4) input."""
    h = onnx.helper
    inits = [
        onnx.numpy_helper.from_array(np.ones(3, np.float32), "scale"),
        onnx.numpy_helper.from_array(np.zeros(3, np.float32), "bias"),
    ]
    nodes, prev = [], "x"
    for i, op in enumerate(ops):
        extra = ["bias", "scale"] if op == "BatchNormalization" else []  # mean, var
        nodes.append(h.make_node(op, [prev, "scale", "bias", *extra], [f"t{i}"]))
        prev = f"t{i}"
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [h.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


def test_exporter_refuses_a_graph_with_batch_norm() -> None:
    assert check_graph("in_autoencoder", _graph_with(["InstanceNormalization"])) == {"InstanceNormalization": 1}
    with pytest.raises(ExportError, match="BatchNormalization"):
        check_graph("in_autoencoder", _graph_with(["InstanceNormalization", "BatchNormalization"]))


def test_exporter_refuses_a_graph_without_instance_norm(tmp_path: Path) -> None:
    # An eval-mode BatchNorm is folded into the conv by the exporter: no norm op is left at all.
    bn_model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Sigmoid()).eval()
    proto = export_onnx("in_autoencoder", bn_model, tmp_path / "bn.onnx")
    with pytest.raises(ExportError, match="lacks"):
        check_graph("in_autoencoder", proto)


def test_exporter_refuses_another_opset() -> None:
    proto = _graph_with(["InstanceNormalization"])
    proto.opset_import[0].version = 17
    with pytest.raises(ExportError, match="opset 18"):
        check_graph("in_autoencoder", proto)


@pytest.mark.parametrize("kind", ["gncnn", "in_autoencoder"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("hw", [(32, 32), (64, 48), (37, 53)])
def test_onnxruntime_matches_pytorch(
    exported: dict[str, ExportResult], kind: str, batch: int, hw: tuple[int, int]
) -> None:
    result = exported[kind]
    spec = ModelSpec.from_dict(result.config.model)  # the model is rebuilt from config.json alone
    model = build_model(spec, result.directory / "weights.safetensors").eval()
    parity = check_parity(kind, model, result.directory / "model.onnx", batches=[batch], sizes=[hw], seed=batch)
    assert parity.max_abs_diff <= PARITY_TOLERANCE


@pytest.mark.parametrize("downsample", ["stride", "maxpool", "conv_maxpool"])
def test_every_downsample_exports_with_parity_at_odd_sizes(tmp_path: Path, downsample: str) -> None:
    torch.manual_seed(0)
    model = GNCNN(widths=(8, 16, 32), depths=(1, 2, 1), downsample=downsample).eval()
    export_onnx("gncnn", model, tmp_path / "m.onnx")
    parity = check_parity("gncnn", model, tmp_path / "m.onnx", batches=[2], sizes=[(37, 53), (5, 7)], seed=0)
    assert parity.max_abs_diff <= PARITY_TOLERANCE
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert ("MaxPool" in ops) == (downsample != "stride")


def test_weight_standardized_convs_export_as_plain_convs_with_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GNCNN(widths=(8, 16, 32), depths=(1, 2, 1), conv="std_conv2d").eval()
    proto = export_onnx("gncnn", model, tmp_path / "m.onnx")
    parity = check_parity("gncnn", model, tmp_path / "m.onnx", batches=[2], sizes=[(32, 32), (37, 53)], seed=0)
    assert parity.max_abs_diff <= PARITY_TOLERANCE  # against the unfolded model: folding kept the function
    # The standardization was done once, at export: the graph is op for op the plain-conv model's,
    # and every Conv reads its weight straight from an initializer (what int8 quantization needs).
    plain = export_onnx("gncnn", GNCNN(widths=(8, 16, 32), depths=(1, 2, 1)).eval(), tmp_path / "plain.onnx")
    assert op_counts(proto) == op_counts(plain)
    inits = {i.name for i in proto.graph.initializer}
    assert all(n.input[1] in inits for n in proto.graph.node if n.op_type == "Conv")


def _tta_export(tmp_path: Path, tta: str, depths: tuple[int, int, int]) -> tuple[GNCNN, ort.InferenceSession]:
    """A small weight-standardized GNCNN exported with `tta`: the model and an ORT session of its graph."""
    torch.manual_seed(0)
    model = GNCNN(widths=(8, 16, 32), depths=depths, conv="std_conv2d").eval()
    weights = tmp_path / "w.safetensors"
    save_weights(model, weights, WeightsInfo(trained=True))
    spec = ModelSpec("gncnn", model.config)
    result = export_to_repository(spec, tmp_path / "repo", weights=weights, labels=list("abcdefghij"), tta=tta)
    assert result.config.export["tta"] == result.config.tta == tta
    assert result.config.parity["max_abs_diff"] <= PARITY_TOLERANCE  # against the same TTA in torch
    return model, ort.InferenceSession(str(result.directory / "model.onnx"), providers=["CPUExecutionProvider"])


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror(tmp_path: Path) -> None:
    model, session = _tta_export(tmp_path, "flip", (1, 2, 1))
    x = torch.rand(3, 3, 32, 40)
    logits, *levels = session.run(None, {"image": x.numpy()})
    mirrored = session.run(["logits"], {"image": x.flip(-1).numpy()})[0]
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1))) / 2
        pyramid = model.forward_pyramid(x)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(mirrored, logits, atol=1e-4)  # an image and its mirror: the same answer
    assert not np.allclose(logits, model(x).detach().numpy(), atol=1e-3)  # and not the plain logits
    for got, want in zip(levels, pyramid, strict=True):  # the pyramid is the image's own, batch N not 2N
        np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-4)


def test_flip_translate_tta_averages_six_views(tmp_path: Path) -> None:
    model, session = _tta_export(tmp_path, "flip-translate", (1, 1, 1))

    def moved(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:  # written out here, not the exporter's helper
        h, w = t.shape[-2:]
        rows = (torch.arange(h) + dy).clamp(0, h - 1)
        cols = (torch.arange(w) + dx).clamp(0, w - 1)
        return t[..., rows, :][..., cols]

    for shape in ((3, 3, 32, 40), (2, 3, 5, 7)):  # any size: the border is replicated
        x = torch.rand(*shape)
        m = x.flip(-1)
        logits, *levels = session.run(None, {"image": x.numpy()})
        views = [x, m, moved(x, -1, -1), moved(m, -1, -1), moved(x, 1, 1), moved(m, 1, 1)]
        with torch.no_grad():
            expected = torch.stack([model(v) for v in views]).mean(0)
            pyramid = model.forward_pyramid(x)
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)
        mirrored = session.run(["logits"], {"image": m.numpy()})[0]
        np.testing.assert_allclose(mirrored, logits, atol=1e-4)  # the mirror's views are the same six
        for got, want in zip(levels, pyramid, strict=True):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_tta_is_for_classifiers_and_known_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="classifiers only"):
        export_onnx("in_autoencoder", build_model(ModelSpec.default("in_autoencoder")), tmp_path / "m.onnx", tta="flip")
    with pytest.raises(ValueError, match="unknown test-time augmentation 'rotate'"):
        export_onnx("gncnn", GNCNN(widths=(8, 16, 32)), tmp_path / "m.onnx", tta="rotate")
    with pytest.raises(SystemExit, match="--tta is for the classifier"):
        normserve(
            ["export", "--model", "in_autoencoder", "--random-init", "--tta", "flip", "--repository", str(tmp_path)]
        )


def test_parity_check_catches_a_mismatch(exported: dict[str, ExportResult]) -> None:
    result = exported["in_autoencoder"]
    model = build_model(ModelSpec.from_dict(result.config.model), result.directory / "weights.safetensors")
    with torch.no_grad():
        model.proj.bias += 0.5  # type: ignore[operator]
    with pytest.raises(ExportError, match="differs"):
        check_parity("in_autoencoder", model, result.directory / "model.onnx", batches=[1], sizes=[(16, 16)])


def test_classifier_outputs_and_pyramid_contract(exported: dict[str, ExportResult]) -> None:
    cfg = exported["gncnn"].config
    assert [o.name for o in cfg.outputs] == ["logits", "p3", "p4", "p5"]
    model = GNCNN(load_spec(shipped_spec_path("gncnn")).config)
    assert cfg.feature_info is not None
    assert [(f.name, f.channels, f.stride) for f in cfg.feature_info] == [
        (f["name"], f["num_chs"], f["reduction"]) for f in model.feature_info
    ]
    session = ort.InferenceSession(str(exported["gncnn"].directory / "model.onnx"))
    logits, p3, p4, p5 = session.run(None, {"image": np.random.rand(2, 3, 37, 53).astype(np.float32)})
    assert logits.shape == (2, 10)
    for lvl, out in zip(cfg.feature_info, (p3, p4, p5), strict=True):
        assert out.shape == (2, lvl.channels, -(-37 // lvl.stride), -(-53 // lvl.stride))


def test_config_json_records_what_was_built(exported: dict[str, ExportResult]) -> None:
    for kind, result in exported.items():
        on_disk = ModelConfigFile.load(result.directory / "config.json")
        assert on_disk == result.config
        assert on_disk.name == kind and on_disk.version == "1"
        assert on_disk.model == load_spec(shipped_spec_path(kind)).to_dict()
        assert on_disk.weights.trained is False and on_disk.weights.extra["random_init_seed"] == 1
        assert on_disk.export["opset"] == 18 and set(on_disk.export["tools"]) == {
            "torch",
            "onnx",
            "onnxscript",
            "onnxruntime",
        }
        assert on_disk.parity["max_abs_diff"] <= PARITY_TOLERANCE
        assert len(on_disk.parity["shapes"]) == 6
    assert exported["gncnn"].config.labels == LABELS
    assert exported["gncnn"].config.preprocessing.resize == (32, 32)
    assert exported["in_autoencoder"].config.preprocessing.resize is None


def test_random_init_must_be_asked_for(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="random init"):
        export_to_repository(ModelSpec.default("in_autoencoder"), tmp_path)
    assert not any(tmp_path.iterdir())


def test_classifier_needs_labels_matching_its_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="10 class labels"):
        export_to_repository(ModelSpec.default("gncnn"), tmp_path, random_seed=0, labels=["a", "b"])


def test_versions_increment_and_are_not_overwritten(tmp_path: Path) -> None:
    spec = ModelSpec.from_dict({"kind": "in_autoencoder", "config": {"base": 4, "bottleneck_depth": 1}})
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_weights(build_model(spec), weights, WeightsInfo(trained=True, extra={"note": "test"}))
    first = export_to_repository(spec, tmp_path / "repo", weights=weights)
    second = export_to_repository(spec, tmp_path / "repo", weights=weights)
    assert (first.version, second.version) == ("1", "2")
    assert (first.directory.stat().st_mode & 0o777) == 0o755  # readable by the server's user
    assert second.config.weights.trained is True and second.config.weights.extra == {"note": "test"}
    with pytest.raises(FileExistsError):
        export_to_repository(spec, tmp_path / "repo", weights=weights, version="1")
    # --overwrite replaces version 1 whole, and leaves no hidden build or old folder behind.
    torch.manual_seed(1)
    save_weights(build_model(spec), weights, WeightsInfo(trained=True, extra={"note": "retrained"}))
    third = export_to_repository(spec, tmp_path / "repo", weights=weights, version="1", overwrite=True)
    assert third.directory == first.directory and third.config.weights.extra == {"note": "retrained"}
    assert third.config.weights.sha256 != first.config.weights.sha256
    assert sorted(p.name for p in (tmp_path / "repo" / "in_autoencoder").iterdir()) == ["1", "2"]


def test_cli_exports_with_explicit_random_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "ae.json"
    cfg.write_text(json.dumps({"kind": "in_autoencoder", "config": {"base": 4, "bottleneck_depth": 0}}))
    rc = normserve(
        [
            "export",
            "--model",
            "in_autoencoder",
            "--config",
            str(cfg),
            "--random-init",
            "--seed",
            "3",
            "--repository",
            str(tmp_path / "repo"),
        ]
    )
    assert rc == 0
    written = ModelConfigFile.load(tmp_path / "repo" / "in_autoencoder" / "1" / "config.json")
    assert written.weights.trained is False and written.model["config"]["base"] == 4
    assert "parity" in capsys.readouterr().out


def _two_class_run(tmp_path: Path, record_spec: bool, widths: list[int] | None = None) -> Path:
    """What `normserve train classifier` writes for a 2-class data set (the served architecture,
    or other widths); with `record_spec` False, a weights file from before the spec was recorded."""
    config = load_spec(shipped_spec_path("gncnn")).config.to_dict() | {"num_classes": 2}
    spec = ModelSpec.from_dict({"kind": "gncnn", "config": config | ({"widths": widths} if widths else {})})
    torch.manual_seed(0)
    info = WeightsInfo(trained=True, labels=["boat", "kitty"], model=spec.to_dict() if record_spec else None)
    weights = tmp_path / "run" / "weights.safetensors"
    save_weights(build_model(spec), weights, info)
    (tmp_path / "run" / "config.json").write_text(json.dumps({**spec.to_dict(), "labels": ["boat", "kitty"]}))
    return weights


def test_weights_carry_their_config_and_labels_so_export_needs_no_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's one-liner, `normserve export --model gncnn --weights RUN/weights.safetensors
    --repository R`, on a 2-class run: the config and labels come from the weights' metadata."""
    weights = _two_class_run(tmp_path, record_spec=True, widths=[8, 8, 8])  # small: a quick export
    rc = normserve(["export", "--model", "gncnn", "--weights", str(weights), "--repository", str(tmp_path / "repo")])
    assert rc == 0
    written = ModelConfigFile.load(tmp_path / "repo" / "gncnn" / "1" / "config.json")
    assert written.labels == ["boat", "kitty"]
    assert written.model["config"]["num_classes"] == 2 and written.model["config"]["widths"] == [8, 8, 8]
    assert "parity" in capsys.readouterr().out


def test_weights_that_do_not_fit_are_one_line_naming_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Weights that record no config do not fit the shipped one: one line that names --config,
    no traceback; with the run's config.json (which holds the labels) the export works."""
    weights = _two_class_run(tmp_path, record_spec=False)
    args = ["export", "--model", "gncnn", "--weights", str(weights), "--repository", str(tmp_path / "repo")]
    with pytest.raises(SystemExit) as stop:
        normserve(args)
    message = str(stop.value.code)
    assert "\n" not in message and "--config" in message, message
    assert message.count("fc.") == 2 and "fc.weight is [2, 256] in the file, [10, 256] in the config" in message
    assert not (tmp_path / "repo" / "gncnn").exists()
    # The run's config.json is what --config takes: the spec that fits, and the labels.
    spec, labels = spec_and_labels("gncnn", weights.parent / "config.json", weights, None)
    assert spec.config.num_classes == 2 and labels == ["boat", "kitty"]
    build_model(spec, weights)


def test_committed_repository_matches_the_shipped_weights() -> None:
    """CI's guard: model_repository/ is exactly models/weights/*, exported at opset 18."""
    assert verify(REPO_ROOT / "model_repository", ["gncnn", "in_autoencoder"]) == []


def test_a_failed_check_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object, **__: object) -> None:
        raise ExportError("parity broken on purpose")

    monkeypatch.setattr("normserve.export.repository.check_parity", fail)
    spec = ModelSpec.from_dict({"kind": "in_autoencoder", "config": {"base": 4, "bottleneck_depth": 0}})
    with pytest.raises(ExportError, match="on purpose"):
        export_to_repository(spec, tmp_path / "repo", random_seed=0)
    assert list((tmp_path / "repo").iterdir()) == []
