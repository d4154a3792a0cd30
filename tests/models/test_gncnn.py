"""GNCNN: pyramid shapes against feature_info, head split, config round trip."""

from __future__ import annotations

import math

import pytest
import torch

from normserve.models import GNCNN, GNCNNConfig, GNConfig, ModelSpec, build_model

SMALL = {"widths": (8, 16, 32), "depths": (1, 2, 1)}


@pytest.mark.parametrize("mode", ["gn", "ln_like", "in_like"])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "none"])
@pytest.mark.parametrize("hw", [(32, 32), (37, 53), (64, 48), (5, 7)])
@pytest.mark.parametrize("downsample", ["stride", "maxpool", "conv_maxpool"])
def test_pyramid_shapes_follow_feature_info(mode: str, act: str, hw: tuple[int, int], downsample: str) -> None:
    cfg = GNCNNConfig(**SMALL, gn=GNConfig(mode=mode), act=act, downsample=downsample)  # type: ignore[arg-type]
    model = GNCNN(cfg).eval()
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
    assert logits.shape == (2, 10)
    assert list(feats) == ["P3", "P4", "P5"]
    for info, (name, f) in zip(model.feature_info, feats.items(), strict=True):
        assert info["name"] == name
        r = info["reduction"]
        assert f.shape == (2, info["num_chs"], math.ceil(hw[0] / r), math.ceil(hw[1] / r))


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_feature_info_strides(stem_stride: int) -> None:
    model = GNCNN(**SMALL, stem_stride=stem_stride)
    assert [f["reduction"] for f in model.feature_info] == [stem_stride, 2 * stem_stride, 4 * stem_stride]
    assert [f["num_chs"] for f in model.feature_info] == [8, 16, 32]


def test_maxpool_downsample_pools_then_convolves_at_stride_one() -> None:
    model = GNCNN(**SMALL, downsample="maxpool")
    for stage in (model.stage1, model.stage2):
        pool, first = stage[0], stage[1]
        assert isinstance(pool, torch.nn.MaxPool2d) and pool.kernel_size == 2
        assert first[0].stride == (1, 1)
    strided = GNCNN(**SMALL)
    assert strided.stage1[0][0].stride == (2, 2)
    # Same parameters either way: the pool has none, so weights differ only in their key names.
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in strided.parameters())


def test_conv_maxpool_downsample_convolves_at_the_input_resolution_then_pools() -> None:
    model = GNCNN(**SMALL, downsample="conv_maxpool").eval()
    for stage, in_chs in ((model.stage1, 8), (model.stage2, 16)):
        first, pool = stage[0], stage[1]
        assert first[0].stride == (1, 1) and first[0].in_channels == in_chs
        assert isinstance(pool, torch.nn.MaxPool2d) and pool.kernel_size == 2
    # The widening conv runs before the pool: stage1's first block sees the stem's full 32×32 map.
    seen: list[tuple[int, ...]] = []
    model.stage1[0].register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    assert seen == [(1, 16, 32, 32)]


def test_forward_is_features_then_head() -> None:
    model = GNCNN(**SMALL).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), logits)
        assert model.forward_head(feats, pre_logits=True).shape == (3, 32)


def test_normalisation_is_inside_the_model() -> None:
    # A constant image equal to the mean becomes all zeros after normalisation, so the stem
    # sees zeros: with no conv bias and GN the P3 map is then the GN shift (zero at init) → relu 0.
    model = GNCNN(**SMALL).eval()
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    with torch.no_grad():
        p3 = model.forward_pyramid(mean)[0]
    assert torch.count_nonzero(p3) == 0
    with torch.no_grad():
        assert torch.count_nonzero(model.forward_pyramid(torch.rand(1, 3, 8, 8))[0]) > 0


def test_config_json_round_trip_rebuilds_identical_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = GNCNNConfig(**SMALL, gn=GNConfig(mode="gn", groups=4, eps=1e-6), act="silu", num_classes=7)  # type: ignore[arg-type]
    assert GNCNNConfig.from_json(cfg.to_json()) == cfg
    spec = ModelSpec("gncnn", cfg)
    assert ModelSpec.from_dict(spec.to_dict()).config == cfg
    torch.manual_seed(0)
    a = build_model(spec)
    from normserve.models.weights import WeightsInfo, save_weights

    save_weights(a, tmp_path / "w.safetensors", WeightsInfo(trained=False))
    b = build_model(ModelSpec.from_dict(spec.to_dict()), tmp_path / "w.safetensors")
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_bad_configs_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="groups=3"):
        GNCNN(widths=(8, 16, 32), gn=GNConfig(groups=3))
    with pytest.raises(ValueError, match="widths"):
        GNCNNConfig(widths=(8, 16))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown config keys"):
        GNCNNConfig.from_dict({"widths": [8, 16, 32], "wdiths": 1})
    with pytest.raises(TypeError):
        GNCNN(GNCNNConfig(), widths=(8, 16, 32))
    with pytest.raises(ValueError, match="unknown downsample 'avgpool'"):
        GNCNNConfig(downsample="avgpool")
