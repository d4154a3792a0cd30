"""The GroupNorm family: `ConvGNAct` blocks and the `GNCNN` classifier with its P3/P4/P5 pyramid.

GNCNN is stem → stage1 → stage2 of ConvGNAct blocks, each stage halving the resolution once in
its opening (a stride-2 first block, a 2×2 max-pool before it, or a 2×2 max-pool after it: the
`downsample` registry), then global average pooling and a linear head. The outputs of stem, stage1 and stage2 are the
pyramid levels P3, P4 and P5; `feature_info` says their channels and strides so the pyramid
endpoint and the tests read shapes from the model instead of repeating them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from normserve.models.layers import ConvNormAct, GNConfig, get_conv_layer, get_norm_layer
from normserve.models.serialization import ConfigMixin

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
PYRAMID_NAMES = ("P3", "P4", "P5")
Triple = tuple[float, float, float]


def _block(cfg: GNCNNConfig, in_chs: int, out_chs: int, stride: int = 1) -> ConvGNAct:
    """One 3×3 ConvGNAct with the config's conv, grouping and activation."""
    return ConvGNAct(in_chs, out_chs, 3, stride, cfg.gn, cfg.act, cfg.conv)


def _stride_downsample(in_chs: int, out_chs: int, cfg: GNCNNConfig) -> list[nn.Module]:
    """The stage's first block does the halving: a 3×3 conv at stride 2."""
    return [_block(cfg, in_chs, out_chs, 2)]


def _maxpool_downsample(in_chs: int, out_chs: int, cfg: GNCNNConfig) -> list[nn.Module]:
    """A 2×2 max-pool halves first, then a stride-1 block (VGG, airbench): the same multiply-adds
    as a stride-2 conv, but every output sees the strongest response of each 2×2 window.
    `ceil_mode` keeps odd sizes at ceil(H / 2) as a stride-2 conv does, so `feature_info` holds."""
    return [nn.MaxPool2d(2, ceil_mode=True), _block(cfg, in_chs, out_chs)]


def _conv_maxpool_downsample(in_chs: int, out_chs: int, cfg: GNCNNConfig) -> list[nn.Module]:
    """A stride-1 block at the input resolution, then a 2×2 max-pool (airbench's ConvGroup):
    the widening conv sees every input position before the halving, at 4× the multiply-adds of
    the other two openings."""
    return [_block(cfg, in_chs, out_chs), nn.MaxPool2d(2, ceil_mode=True)]


_DOWNSAMPLE_MAP: dict[str, Callable[[int, int, GNCNNConfig], list[nn.Module]]] = {
    "stride": _stride_downsample,
    "maxpool": _maxpool_downsample,
    "conv_maxpool": _conv_maxpool_downsample,
}


def get_downsample(name: str) -> Callable[[int, int, GNCNNConfig], list[nn.Module]]:
    """The `(in_chs, out_chs, config) -> modules` that open a stage, by registry name."""
    try:
        return _DOWNSAMPLE_MAP[name]
    except KeyError:
        raise ValueError(f"unknown downsample {name!r}; known: {sorted(_DOWNSAMPLE_MAP)}") from None


class ConvGNAct(ConvNormAct):
    """conv (conv2d | std_conv2d) → GroupNormFlex → act (relu | silu | gelu | none)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        gn: GNConfig | None = None,
        act: str = "relu",
        conv: str = "conv2d",
    ) -> None:
        norm = get_norm_layer("groupnorm", gn or GNConfig())
        super().__init__(in_chs, out_chs, kernel_size, stride, norm, act, conv)


@dataclass
class GNCNNConfig(ConfigMixin):
    """Everything needed to rebuild a GNCNN exactly; stored in the model repository."""

    in_chans: int = 3  # input image channels
    num_classes: int = 10  # classifier outputs
    widths: tuple[int, int, int] = (64, 128, 256)  # channels of stem, stage1, stage2
    depths: tuple[int, int, int] = (2, 2, 2)  # ConvGNAct blocks in stem, stage1, stage2
    stem_stride: int = 1  # stride of the first block; 1 suits 32x32 inputs
    downsample: str = "stride"  # how stage1 and stage2 halve: "stride" | "maxpool" | "conv_maxpool"
    gn: GNConfig = field(default_factory=GNConfig)  # GroupNorm grouping for every block
    act: str = "relu"  # activation registry name
    conv: str = "conv2d"  # conv registry name: "conv2d" | "std_conv2d" (weight standardization)
    drop_rate: float = 0.0  # dropout before the linear head (training only)
    mean: tuple[float, float, float] = CIFAR10_MEAN  # input normalisation, applied inside the graph
    std: tuple[float, float, float] = CIFAR10_STD
    input_size: tuple[int, int] = (32, 32)  # (H, W) clients' images are resized to for /classify

    def __post_init__(self) -> None:
        for name in ("widths", "depths"):
            value = tuple(getattr(self, name))
            if len(value) != 3 or any(v < 1 for v in value):
                raise ValueError(f"{name} must be three positive ints (stem, stage1, stage2), got {value}")
            setattr(self, name, value)
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean and std need {self.in_chans} values each")
        self.mean, self.std = cast(Triple, tuple(self.mean)), cast(Triple, tuple(self.std))
        self.input_size = tuple(self.input_size)  # type: ignore[assignment]
        get_downsample(self.downsample)  # unknown names fail here, not at build time
        get_conv_layer(self.conv)
        # Validate grouping now so a bad config fails at construction with a clear message.
        for c in self.widths:
            self.gn.num_groups(c)


def _then_blocks(opening: list[nn.Module], chs: int, depth: int, cfg: GNCNNConfig) -> nn.Sequential:
    """`opening` (which counts as one block), then depth - 1 stride-1 blocks of `chs` channels."""
    return nn.Sequential(*opening, *(_block(cfg, chs, chs) for _ in range(depth - 1)))


def _stem(cfg: GNCNNConfig) -> nn.Sequential:
    w = cfg.widths[0]
    return _then_blocks([_block(cfg, cfg.in_chans, w, cfg.stem_stride)], w, cfg.depths[0], cfg)


def _stage(in_chs: int, out_chs: int, depth: int, cfg: GNCNNConfig) -> nn.Sequential:
    """A stage at half the resolution of its input: the downsample opening, then depth - 1 blocks."""
    return _then_blocks(get_downsample(cfg.downsample)(in_chs, out_chs, cfg), out_chs, depth, cfg)


class GNCNN(nn.Module):
    """Small GroupNorm CNN classifier with a three-level feature pyramid.

    Inputs are float images in [0, 1], (N, C, H, W); mean/std normalisation is part of the
    model so exported graphs carry it and clients never repeat it.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: GNCNNConfig | None = None, **overrides: object) -> None:
        super().__init__()
        cfg = config or GNCNNConfig(**overrides)  # type: ignore[arg-type]
        if config is not None and overrides:
            raise TypeError("pass either a GNCNNConfig or keyword overrides, not both")
        self.config = cfg
        w, d = cfg.widths, cfg.depths
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)
        self.stem = _stem(cfg)
        self.stage1 = _stage(w[0], w[1], d[1], cfg)
        self.stage2 = _stage(w[1], w[2], d[2], cfg)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(w[2], cfg.num_classes)
        r = cfg.stem_stride
        self.feature_info: list[dict[str, Any]] = [
            dict(name=n, num_chs=c, reduction=red, module=m)
            for n, c, red, m in zip(PYRAMID_NAMES, w, (r, 2 * r, 4 * r), ("stem", "stage1", "stage2"), strict=True)
        ]

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """P3, P4, P5: the outputs of stem, stage1 and stage2."""
        x = (x - self.mean) / self.std
        p3 = self.stem(x)  # (N, w0, H/r, W/r)
        p4 = self.stage1(p3)  # (N, w1, H/2r, W/2r)
        p5 = self.stage2(p4)  # (N, w2, H/4r, W/4r)
        return [p3, p4, p5]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pyramid(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # (N, w2): global average pool
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        levels = self.forward_pyramid(x)
        logits = self.forward_head(levels[-1])
        if not return_features:
            return logits
        return logits, dict(zip(PYRAMID_NAMES, levels, strict=True))
