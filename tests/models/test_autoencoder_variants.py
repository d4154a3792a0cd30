"""Denoiser variants (skips, global residual): input-sized outputs for odd sizes, ONNX export with
dynamic H/W, and a default configuration that is exactly the plain design."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from normserve.models.autoencoder import AutoEncoderConfig, SimpleIN_AutoEncoder

VARIANTS = [
    {"skips": True},
    {"residual": True},
    {"skips": True, "residual": True},
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "convtranspose"])
@pytest.mark.parametrize("hw", [(37, 53), (32, 32), (5, 7)])
def test_variant_output_has_input_size(variant: dict[str, bool], upsample: str, hw: tuple[int, int]) -> None:
    model = SimpleIN_AutoEncoder(base=4, bottleneck_depth=1, upsample=upsample, **variant).eval()
    x = torch.rand(2, 3, *hw)
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
