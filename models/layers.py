"""Layer registries and the normalisation building blocks shared by both model families.

Blocks never branch on a conv, norm or activation name: they ask a registry for a class
(`get_conv_layer`, `get_act_layer`, `get_norm_layer`) the way timm's `create_act.py` /
`create_norm.py` do, so a new layer is one entry in a map, and an unknown name is one clear error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

GNMode = Literal["gn", "ln_like", "in_like"]
GN_MODES: tuple[str, ...] = get_args(GNMode)
PREFERRED_GROUPS: tuple[int, ...] = (32, 16, 8, 4, 2, 1)

_ACT_MAP: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "none": nn.Identity,
}


def get_act_layer(name: str) -> type[nn.Module]:
    """Return the activation class registered under `name`."""
    try:
        return _ACT_MAP[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACT_MAP)}") from None


def create_act_layer(name: str) -> nn.Module:
    """Instantiate the activation registered under `name` (in-place variants are avoided so
    that the exported graph and autograd never see aliasing)."""
    return get_act_layer(name)()


class StdConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization (Qiao et al. 2019; timm's `StdConv2d`, BiT's convs).

    Each filter is shifted and scaled to zero mean and unit variance over its fan-in before it
    convolves. GroupNorm normalises activations per sample, WS normalises the weights: together
    they smooth the loss landscape the way BatchNorm does, without batch statistics, and
    training converges faster. At inference the standardized weight is a constant:
    `fold_weight_standardization` turns the layer into a plain `nn.Conv2d`, so exported graphs
    hold ordinary Conv nodes (and int8 quantization sees ordinary weights).
    """

    def __init__(self, *args: object, eps: float = 1e-6, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        return (w - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


_CONV_MAP: dict[str, type[nn.Conv2d]] = {
    "conv2d": nn.Conv2d,
    "std_conv2d": StdConv2d,
}
CONV_NAMES: tuple[str, ...] = tuple(_CONV_MAP)


def get_conv_layer(name: str) -> type[nn.Conv2d]:
    """Return the 2-D convolution class registered under `name`."""
    try:
        return _CONV_MAP[name]
    except KeyError:
        raise ValueError(f"unknown conv {name!r}; known: {sorted(_CONV_MAP)}") from None


def fold_weight_standardization(model: nn.Module) -> nn.Module:
    """`model` itself if it has no `StdConv2d`; otherwise a copy in which each one is an
    `nn.Conv2d` holding its standardized weight: the same function, with the standardization
    done once instead of on every call (the inference form that is exported)."""
    if not any(isinstance(m, StdConv2d) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, StdConv2d):
                continue
            plain = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,  # type: ignore[arg-type]
                stride=child.stride,  # type: ignore[arg-type]
                padding=child.padding,  # type: ignore[arg-type]
                dilation=child.dilation,  # type: ignore[arg-type]
                groups=child.groups,
                bias=child.bias is not None,
                padding_mode=child.padding_mode,
            )
            with torch.no_grad():
                plain.weight.copy_(child.standardized_weight())
                if child.bias is not None and plain.bias is not None:
                    plain.bias.copy_(child.bias)
            plain.train(child.training)
            setattr(parent, child_name, plain)
    return model


def choose_gn_groups(num_channels: int, preferred: Sequence[int] = PREFERRED_GROUPS) -> int:
    """First of `preferred` that divides `num_channels`.

    With the default preference ending in 1 this always succeeds for C >= 1; a custom
    preference that has no divisor raises ValueError rather than silently picking one.
    """
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    for g in preferred:
        if g >= 1 and num_channels % g == 0:
            return g
    raise ValueError(f"none of the preferred group counts {tuple(preferred)} divides C={num_channels}")


@dataclass(frozen=True)
class GNConfig:
    """How a GroupNorm layer splits its channels."""

    mode: GNMode = "gn"  # "gn": `groups` groups; "ln_like": 1 group; "in_like": C groups
    groups: int | Literal["auto"] = "auto"  # "gn" only: an int, or "auto" = choose_gn_groups(C)
    eps: float = 1e-5  # added to the variance
    affine: bool = True  # learnable per-channel scale and shift

    def __post_init__(self) -> None:
        if self.mode not in GN_MODES:
            raise ValueError(f"unknown GN mode {self.mode!r}; known: {list(GN_MODES)}")
        if self.groups != "auto" and (not isinstance(self.groups, int) or isinstance(self.groups, bool)):
            raise ValueError(f"groups must be an int or 'auto', got {self.groups!r}")
        if isinstance(self.groups, int) and self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")

    def num_groups(self, num_channels: int) -> int:
        """The group count for a layer of `num_channels` channels (the one place it is decided)."""
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        if self.mode == "ln_like":
            return 1
        if self.mode == "in_like":
            return num_channels
        if self.groups == "auto":
            return choose_gn_groups(num_channels)
        if num_channels % self.groups != 0:
            raise ValueError(
                f"GroupNorm: groups={self.groups} does not divide C={num_channels} "
                f"(use groups='auto' or a divisor of {num_channels})"
            )
        return self.groups


class GroupNormFlex(nn.GroupNorm):
    """`nn.GroupNorm` whose group count comes from a `GNConfig`.

    NOTE: at ONNX opset 18 the exporter lowers this to Reshape → InstanceNormalization →
    Reshape → Mul → Add; the native GroupNormalization-18 op is deprecated.
    """

    def __init__(self, num_channels: int, config: GNConfig | None = None) -> None:
        config = config or GNConfig()
        super().__init__(config.num_groups(num_channels), num_channels, eps=config.eps, affine=config.affine)
        self.config = config


class InstanceNormFlex(nn.InstanceNorm2d):
    """Instance norm with statistics of the input at inference too (no running stats)."""

    def __init__(self, num_channels: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__(num_channels, eps=eps, affine=affine, track_running_stats=False)


NormFactory = Callable[[int], nn.Module]


def _gn_factory(config: GNConfig) -> NormFactory:
    return lambda c: GroupNormFlex(c, config)


def _in_factory(affine: bool) -> NormFactory:
    return lambda c: InstanceNormFlex(c, affine=affine)


_NORM_MAP: dict[str, Callable[..., NormFactory]] = {
    "groupnorm": _gn_factory,
    "instancenorm": _in_factory,
}


def get_norm_layer(name: str, *args: object) -> NormFactory:
    """Return a `num_channels -> norm layer` factory for the norm registered under `name`.

    `args` are the norm's settings (a `GNConfig` for "groupnorm", `affine` for "instancenorm").
    """
    try:
        make = _NORM_MAP[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; known: {sorted(_NORM_MAP)}") from None
    return make(*args)


class ConvNormAct(nn.Sequential):
    """conv → norm → act; the conv and act arrive as registry names, the norm as a factory."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        norm: NormFactory,
        act: str,
        conv: str = "conv2d",
    ) -> None:
        # No conv bias: the norm's shift makes it redundant.
        super().__init__(
            get_conv_layer(conv)(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            norm(out_chs),
            create_act_layer(act),
        )
