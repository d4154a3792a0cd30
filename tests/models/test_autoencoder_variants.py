"""Denoiser variants (skips, global residual): input-sized outputs for odd sizes, ONNX export with
dynamic H/W, and a default configuration that is exactly the plain design."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from normserve.models.autoencoder import AutoEncoderConfig, SimpleIN_AutoEncoder

VARIANTS: list[dict[str, object]] = [
    {"skips": True},
    {"residual": True},
    {"skips": True, "residual": True},
    # Capacity extensions of issue #30 (full-resolution stem, a third scale), alone and together,
    # on the plain design and on the served variant.
    {"stem": 1},
    {"stem": 2, "scales": 3},
    {"scales": 3},
    {"scales": 3, "skips": True, "residual": True},
    {"stem": 1, "scales": 3, "skips": True, "residual": True},
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "convtranspose"])
@pytest.mark.parametrize("hw", [(37, 53), (32, 32), (5, 9), (5, 7)])
def test_variant_output_has_input_size(variant: dict[str, object], upsample: str, hw: tuple[int, int]) -> None:
    model = SimpleIN_AutoEncoder(base=4, bottleneck_depth=1, upsample=upsample, **variant).eval()  # type: ignore[arg-type]
    with torch.no_grad():  # a non-zero projection, so the residual variants do not return the input
        model.proj.weight.normal_(0, 0.1)
    x = torch.rand(2, 3, *hw)
    if variant.get("scales") == 3 and max(hw) <= 8:
        # Both sides pad to 8, so the /8 level is 1x1: ONNX Runtime normalises it (to the IN
        # shift), but torch's instance_norm refuses a single spatial element.
        with pytest.raises(ValueError, match="spatial element"), torch.inference_mode():
            model(x)
        return
    with torch.inference_mode():
        y = model(x)
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_residual_starts_as_identity() -> None:
    """The zero-initialised projection predicts no noise, so an untrained residual net passes
    [0, 1] images through unchanged (a good starting point for denoising)."""
    model = SimpleIN_AutoEncoder(base=4, residual=True, skips=True).eval()
    x = torch.rand(1, 3, 37, 53)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), x)


def test_skips_feed_the_raw_input_to_the_output() -> None:
    """With skips the projection also reads the (padded) input image, which has not been through
    InstanceNorm; the plain design's projection reads normalised features only."""
    assert SimpleIN_AutoEncoder(base=4).proj.in_channels == 4
    assert SimpleIN_AutoEncoder(base=4, skips=True).proj.in_channels == 4 + 3


def test_default_config_is_the_plain_design() -> None:
    cfg = AutoEncoderConfig()
    assert cfg.skips is False and cfg.residual is False
    # A config file written before the variants existed (no skips/residual keys) loads as the design.
    before_variants = {"in_ch": 3, "base": 32, "bottleneck_depth": 2, "act": "relu", "in_affine": True}
    assert AutoEncoderConfig.from_dict({**before_variants, "upsample": "nearest"}) == cfg
    model = SimpleIN_AutoEncoder().eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["dec1.1.0.weight"] == (32, 64, 3, 3) and shapes["dec2.1.0.weight"] == (32, 32, 3, 3)
    assert shapes["proj.weight"] == (3, 32, 3, 3)
    assert not any(k.startswith(("dec1.conv", "dec2.conv", "dec1.up")) for k in shapes)
    # Same function as the design written out by hand.
    x = torch.rand(1, 3, 37, 53)
    with torch.inference_mode():
        y = F.pad(x, (0, 3, 0, 3), mode="reflect")
        y = model.dec2(model.dec1(model.bottleneck(model.enc2(model.enc1(y)))))
        ref = torch.sigmoid(model.proj(y))[..., :37, :53]
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


@pytest.mark.slow
def test_variant_exports_with_dynamic_size(tmp_path: Path) -> None:
    from normserve.export.onnx_export import check_graph, check_parity, export_onnx

    model = SimpleIN_AutoEncoder(base=4, bottleneck_depth=1, skips=True, residual=True).eval()
    with torch.no_grad():  # a non-zero projection so parity compares more than the identity
        model.proj.weight.normal_(0, 0.1)
    path = tmp_path / "ae.onnx"
    proto = export_onnx("in_autoencoder", model, path)
    counts = check_graph("in_autoencoder", proto)
    assert "Clip" in counts and "Concat" in counts
    check_parity("in_autoencoder", model, path, batches=(1,), sizes=((37, 53),))


def test_extensions_change_the_structure_only_when_on() -> None:
    """stem and scales default off: the served config's modules and state-dict keys are those it
    always had, and switching an extension on adds its modules and widens only what reads them."""
    served = {"base": 32, "bottleneck_depth": 4, "skips": True, "residual": True}
    plain_keys = set(SimpleIN_AutoEncoder(**served).state_dict())  # type: ignore[arg-type]
    assert AutoEncoderConfig().stem == 0 and AutoEncoderConfig().scales == 2
    assert not any(k.startswith(("stem", "enc3", "dec0")) for k in plain_keys)
    stem = SimpleIN_AutoEncoder(**served, stem=1)  # type: ignore[arg-type]
    assert stem.enc1[0].in_channels == 32 and stem.dec2.conv[0].in_channels == 32 + 3 + 32
    assert set(stem.state_dict()) - plain_keys == {k for k in stem.state_dict() if k.startswith("stem.")}
    deep = SimpleIN_AutoEncoder(**served, scales=3)  # type: ignore[arg-type]
    assert deep.bottleneck[0][0].in_channels == 128 and deep.size_multiple == 8
    added = {k.split(".")[0] for k in set(deep.state_dict()) - plain_keys}
    assert added == {"enc3", "dec0"}


@pytest.mark.parametrize("bad", [{"scales": 1}, {"scales": 4}, {"stem": -1}])
def test_extension_rejects_bad_sizes(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        AutoEncoderConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.slow
def test_extension_exports_with_dynamic_size(tmp_path: Path) -> None:
    from normserve.export.onnx_export import check_graph, check_parity, export_onnx

    model = SimpleIN_AutoEncoder(base=4, bottleneck_depth=1, skips=True, residual=True, stem=1, scales=3).eval()
    with torch.no_grad():
        model.proj.weight.normal_(0, 0.1)
    path = tmp_path / "ae.onnx"
    check_graph("in_autoencoder", export_onnx("in_autoencoder", model, path))
    check_parity("in_autoencoder", model, path, batches=(1,), sizes=((37, 53), (21, 16)))


def test_v4_candidate_config_builds_the_third_scale() -> None:
    """models/configs/in_autoencoder_v4.json (issue #30's candidate, not served) is v3's config
    plus the /8 level, and rebuilds through the same spec loader as the served config."""
    from normserve.models.registry import build_model
    from normserve.models.weights import load_spec, shipped_dir, shipped_spec_path

    served = load_spec(shipped_spec_path("in_autoencoder"))
    v4 = load_spec(shipped_dir() / "configs" / "in_autoencoder_v4.json")
    assert v4.kind == "in_autoencoder"
    assert {**served.config.to_dict(), "scales": 3} == v4.config.to_dict()
    model = build_model(v4)
    assert sum(p.numel() for p in model.parameters()) == 833844
