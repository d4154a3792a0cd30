"""Layer registries and the normalisation building blocks shared by both model families.

Blocks never branch on a norm or activation name: they ask a registry for a class
(`get_act_layer`, `get_norm_layer`) the way timm's `create_act.py` / `create_norm.py` do, so a
new activation or norm is one entry in a map, and an unknown name is one clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

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
    """conv → norm → act; the norm and act arrive as a factory and a registry name."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        norm: NormFactory,
        act: str,
    ) -> None:
        # No conv bias: the norm's shift makes it redundant.
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            norm(out_chs),
            create_act_layer(act),
        )
