"""SimpleIN_AutoEncoder: sizes (odd ones too), instance statistics, upsampling modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normserve.models import AutoEncoderConfig, ConvINAct, SimpleIN_AutoEncoder


@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "convtranspose"])
@pytest.mark.parametrize("hw", [(32, 32), (64, 48), (37, 53), (5, 5), (5, 7), (130, 3 * 43)])
def test_output_has_input_size_and_range(upsample: str, hw: tuple[int, int]) -> None:
    model = SimpleIN_AutoEncoder(base=8, bottleneck_depth=1, upsample=upsample).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, *hw))
    assert y.shape == (2, 3, *hw)
    assert ((y > 0) & (y < 1)).all()  # sigmoid output


def test_structure_follows_the_design() -> None:
    model = SimpleIN_AutoEncoder(base=16, bottleneck_depth=3)
    x = torch.rand(1, 3, 32, 32)
    e1 = model.enc1(x)
    e2 = model.enc2(e1)
    assert e1.shape == (1, 16, 16, 16)  # /2
    assert e2.shape == (1, 32, 8, 8)  # /4 with 2x channels
    assert len(model.bottleneck) == 3
    assert all(isinstance(b, ConvINAct) for b in model.bottleneck)
    assert isinstance(model.dec1[0], nn.Upsample) and isinstance(model.dec2[0], nn.Upsample)


def test_instance_norm_uses_instance_statistics_at_inference() -> None:
    model = SimpleIN_AutoEncoder(base=8).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(not n.track_running_stats and n.running_mean is None for n in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # Same image in two batches of different company gives the same output (no batch statistics).
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        alone = model(x)
        together = model(torch.cat([x, torch.rand(3, 3, 16, 16) * 5]))[:1]
    torch.testing.assert_close(alone, together)


@pytest.mark.parametrize("affine", [True, False])
def test_conv_in_act_affine_flag(affine: bool) -> None:
    block = ConvINAct(3, 8, 3, 1, in_affine=affine, act="gelu")
    norm = block[1]
    assert isinstance(norm, nn.InstanceNorm2d) and norm.affine is affine
    assert isinstance(block[2], nn.GELU)


def test_config_errors_and_round_trip() -> None:
    with pytest.raises(ValueError, match="upsample"):
        AutoEncoderConfig(upsample="pixelshuffle")
    cfg = AutoEncoderConfig(base=8, act="silu", upsample="bilinear", in_affine=False)
    assert AutoEncoderConfig.from_json(cfg.to_json()) == cfg
