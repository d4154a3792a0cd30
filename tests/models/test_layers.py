"""Group choice, GN modes, the conv/norm/activation registries, weight standardization and ConvGNAct."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normserve.models import (
    ConvGNAct,
    GNConfig,
    GroupNormFlex,
    choose_gn_groups,
    create_act_layer,
    get_act_layer,
    get_norm_layer,
)
from normserve.models.gncnn import GNCNN
from normserve.models.layers import StdConv2d, fold_weight_standardization, get_conv_layer

CHANNELS = [1, 3, 8, 12, 16, 24, 48, 64, 96, 100, 128]
EXPECTED_AUTO = {1: 1, 3: 1, 8: 8, 12: 4, 16: 16, 24: 8, 48: 16, 64: 32, 96: 32, 100: 4, 128: 32}
ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "none": nn.Identity}


@pytest.mark.parametrize("c", CHANNELS)
def test_choose_gn_groups_is_first_preferred_divisor(c: int) -> None:
    g = choose_gn_groups(c)
    assert g == EXPECTED_AUTO[c]
    assert c % g == 0
    assert all(c % p != 0 for p in (32, 16, 8, 4, 2, 1) if p > g)


def test_choose_gn_groups_custom_preference_and_errors() -> None:
    assert choose_gn_groups(12, preferred=(5, 3)) == 3
    with pytest.raises(ValueError, match="C=7"):
        choose_gn_groups(7, preferred=(4, 2))
    with pytest.raises(ValueError, match="num_channels"):
        choose_gn_groups(0)


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("mode", ["gn", "ln_like", "in_like"])
def test_group_norm_flex_groups_per_mode(c: int, mode: str) -> None:
    layer = GroupNormFlex(c, GNConfig(mode=mode))  # type: ignore[arg-type]
    expected = {"gn": EXPECTED_AUTO[c], "ln_like": 1, "in_like": c}[mode]
    assert isinstance(layer, nn.GroupNorm)
    assert layer.num_groups == expected
    x = torch.randn(2, c, 5, 7)
    y = layer(x)
    # Each group is normalised to zero mean / unit variance (affine starts at identity).
    grouped = y.reshape(2, expected, -1)
    torch.testing.assert_close(grouped.mean(-1), torch.zeros(2, expected), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("c", "groups"), [(64, 8), (96, 3), (100, 25), (12, 12)])
def test_explicit_groups_that_divide(c: int, groups: int) -> None:
    assert GroupNormFlex(c, GNConfig(groups=groups)).num_groups == groups


@pytest.mark.parametrize(("c", "groups"), [(64, 3), (100, 8), (3, 2), (12, 5)])
def test_explicit_groups_that_do_not_divide_raise_naming_c_and_groups(c: int, groups: int) -> None:
    with pytest.raises(ValueError, match=rf"groups={groups}.*C={c}"):
        GroupNormFlex(c, GNConfig(groups=groups))


@pytest.mark.parametrize("bad", [{"mode": "bn"}, {"groups": 0}, {"groups": "four"}, {"groups": True}])
def test_gn_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        GNConfig(**bad)  # type: ignore[arg-type]


def test_gn_config_eps_and_affine_reach_the_layer() -> None:
    layer = GroupNormFlex(16, GNConfig(eps=1e-3, affine=False))
    assert layer.eps == 1e-3
    assert layer.weight is None and layer.bias is None


@pytest.mark.parametrize(("name", "cls"), ACTS.items())
def test_activation_registry(name: str, cls: type[nn.Module]) -> None:
    assert get_act_layer(name) is cls
    assert isinstance(create_act_layer(name), cls)


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(ValueError, match="relu"):
        get_act_layer("swish2")
    with pytest.raises(ValueError, match="groupnorm"):
        get_norm_layer("batchnorm")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", ["gn", "ln_like", "in_like"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_gn_act(act: str, mode: str, stride: int) -> None:
    block = ConvGNAct(3, 24, 3, stride, GNConfig(mode=mode), act)  # type: ignore[arg-type]
    conv, norm, activation = block
    assert isinstance(conv, nn.Conv2d) and conv.bias is None
    assert isinstance(norm, GroupNormFlex)
    assert isinstance(activation, ACTS[act])
    y = block(torch.randn(2, 3, 17, 10))
    assert y.shape == (2, 24, -(-17 // stride), -(-10 // stride))
    if act == "relu":
        assert (y >= 0).all()


def test_conv_registry_and_unknown_name() -> None:
    assert get_conv_layer("conv2d") is nn.Conv2d
    assert get_conv_layer("std_conv2d") is StdConv2d
    with pytest.raises(ValueError, match="unknown conv 'bogus'"):
        get_conv_layer("bogus")
    with pytest.raises(ValueError, match="unknown conv"):
        ConvGNAct(3, 8, conv="bogus")


def test_std_conv_convolves_with_each_filter_standardized() -> None:
    torch.manual_seed(0)
    conv = StdConv2d(5, 7, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.5)  # far from standardized already
    w = conv.standardized_weight()
    flat = w.reshape(7, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(7), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.var(1, correction=0), torch.ones(7), atol=1e-4, rtol=0)
    x = torch.randn(2, 5, 9, 11)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, w, padding=1))
    # Scaling or shifting a filter does not change what it computes: the point of WS.
    with torch.no_grad():
        conv.weight.mul_(10.0).add_(-2.0)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, w, padding=1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["gn", "ln_like", "in_like"])
def test_folding_weight_standardization_keeps_the_function(mode: str) -> None:
    torch.manual_seed(0)
    model = GNCNN(widths=(8, 16, 32), depths=(1, 2, 1), conv="std_conv2d", gn=GNConfig(mode=mode)).eval()  # type: ignore[arg-type]
    folded = fold_weight_standardization(model)
    assert folded is not model
    assert not any(isinstance(m, StdConv2d) for m in folded.modules())
    assert sum(isinstance(m, StdConv2d) for m in model.modules()) == 4  # the original is untouched
    assert folded.state_dict().keys() == model.state_dict().keys()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    plain = GNCNN(widths=(8, 16, 32), depths=(1, 2, 1))
    assert fold_weight_standardization(plain) is plain  # nothing to fold: no copy
