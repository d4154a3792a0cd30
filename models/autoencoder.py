"""The InstanceNorm family: `ConvINAct` blocks and the `SimpleIN_AutoEncoder` denoiser.

Instance statistics are used at inference too (`track_running_stats=False`), so the exported
graph holds InstanceNormalization and never BatchNormalization.

InstanceNorm discards each feature map's mean and scale, so the plain design (every path to
the output passes through IN) cannot reproduce an image's absolute brightness or colour cast.
Two opt-in variants give the decoder access to the raw input again; both default to off so the
plain design keeps its exact structure and state-dict keys:

* `skips`: U-Net style skips. The /2 decoder block also sees enc1's features, the full-resolution
  decoder block and the output projection also see the (padded) input image itself.
* `residual`: global residual. The projection predicts the noise and the output is
  `clamp(input - noise, 0, 1)` instead of `sigmoid(projection)`.

Two more opt-in extensions add capacity where the plain shape has little (issue #30); they also
default off and add modules only when switched on:

* `stem`: ConvINAct blocks at full resolution (`base` channels) before the first downsampling.
  With skips the full-resolution decoder block sees their features beside the input image.
* `scales=3`: a third downsampling to /8 with 4x `base` channels; the bottleneck then runs at /8
  and one more decoder block (`dec0`, with skips merging enc2's features) brings it back to /4.
  Inputs are padded to a multiple of 8 instead of 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from normserve.models.layers import ConvNormAct, create_act_layer, get_norm_layer
from normserve.models.serialization import ConfigMixin

# The default encoder halves the resolution twice; inputs are padded to a multiple of this
# (of 2 ** scales in general).
SIZE_MULTIPLE = 4
SCALES = (2, 3)


class ConvINAct(ConvNormAct):
    """conv → InstanceNorm2d(track_running_stats=False, affine=in_affine) → act."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        in_affine: bool = True,
        act: str = "relu",
    ) -> None:
        super().__init__(in_chs, out_chs, kernel_size, stride, get_norm_layer("instancenorm", in_affine), act)


class _UpsampleConv(nn.Sequential):
    """×2 interpolation, then a ConvINAct block."""

    def __init__(self, mode: str, in_chs: int, out_chs: int, in_affine: bool, act: str) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode=mode), ConvINAct(in_chs, out_chs, 3, 1, in_affine, act))


class _TransposeConv(nn.Sequential):
    """Learned ×2 upsampling: ConvTranspose2d(k=4, s=2, p=1) → IN → act."""

    def __init__(self, in_chs: int, out_chs: int, in_affine: bool, act: str) -> None:
        conv = nn.ConvTranspose2d(in_chs, out_chs, 4, stride=2, padding=1, bias=False)
        norm = get_norm_layer("instancenorm", in_affine)(out_chs)
        super().__init__(conv, norm, create_act_layer(act))


_UPSAMPLE_MAP = {
    "nearest": lambda i, o, a, act: _UpsampleConv("nearest", i, o, a, act),
    "bilinear": lambda i, o, a, act: _UpsampleConv("bilinear", i, o, a, act),
    "convtranspose": _TransposeConv,
}


def create_upsample(name: str, in_chs: int, out_chs: int, in_affine: bool, act: str) -> nn.Module:
    try:
        make = _UPSAMPLE_MAP[name]
    except KeyError:
        raise ValueError(f"unknown upsample {name!r}; known: {sorted(_UPSAMPLE_MAP)}") from None
    return make(in_chs, out_chs, in_affine, act)


class _SkipUpsampleConv(nn.Module):
    """×2 interpolation, concatenate the skip, then one ConvINAct block over both."""

    def __init__(self, mode: str, in_chs: int, skip_chs: int, out_chs: int, in_affine: bool, act: str) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode=mode)
        self.conv = ConvINAct(in_chs + skip_chs, out_chs, 3, 1, in_affine, act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class _SkipTransposeConv(nn.Module):
    """Learned ×2 upsampling, concatenate the skip, then a 1x1 ConvINAct fuses both."""

    def __init__(self, in_chs: int, skip_chs: int, out_chs: int, in_affine: bool, act: str) -> None:
        super().__init__()
        self.up = _TransposeConv(in_chs, out_chs, in_affine, act)
        self.conv = ConvINAct(out_chs + skip_chs, out_chs, 1, 1, in_affine, act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


_SKIP_UPSAMPLE_MAP = {
    "nearest": lambda i, s, o, a, act: _SkipUpsampleConv("nearest", i, s, o, a, act),
    "bilinear": lambda i, s, o, a, act: _SkipUpsampleConv("bilinear", i, s, o, a, act),
    "convtranspose": _SkipTransposeConv,
}


def create_skip_upsample(name: str, in_chs: int, skip_chs: int, out_chs: int, in_affine: bool, act: str) -> nn.Module:
    """A decoder block `forward(x, skip)` that doubles x's resolution and merges `skip` into it."""
    try:
        make = _SKIP_UPSAMPLE_MAP[name]
    except KeyError:
        raise ValueError(f"unknown upsample {name!r}; known: {sorted(_SKIP_UPSAMPLE_MAP)}") from None
    return make(in_chs, skip_chs, out_chs, in_affine, act)


@dataclass
class AutoEncoderConfig(ConfigMixin):
    """Everything needed to rebuild a SimpleIN_AutoEncoder exactly; stored in the repository."""

    in_ch: int = 3  # image channels in and out
    base: int = 32  # channels at /2; the /4 level has 2x this
    bottleneck_depth: int = 2  # ConvINAct blocks at /4
    act: str = "relu"  # activation registry name
    in_affine: bool = True  # learnable InstanceNorm scale/shift
    upsample: str = "nearest"  # "nearest" | "bilinear" | "convtranspose"
    skips: bool = False  # encoder→decoder skips (enc1 at /2, the input image at full resolution)
    residual: bool = False  # predict the noise: output = clamp(input - projection, 0, 1)
    stem: int = 0  # ConvINAct blocks at full resolution before the first downsampling
    scales: int = 2  # downsamplings: 2 (/2, /4) or 3 (adds /8 with 4x base channels; bottleneck at /8)

    def __post_init__(self) -> None:
        if self.base < 1 or self.bottleneck_depth < 0 or self.in_ch < 1 or self.stem < 0:
            raise ValueError(f"invalid autoencoder sizes: {self}")
        if self.scales not in SCALES:
            raise ValueError(f"scales must be one of {SCALES}, got {self.scales}")
        if self.upsample not in _UPSAMPLE_MAP:
            raise ValueError(f"unknown upsample {self.upsample!r}; known: {sorted(_UPSAMPLE_MAP)}")


class SimpleIN_AutoEncoder(nn.Module):  # noqa: N801 - the design's name
    """enc1 (/2) → enc2 (/4, 2× channels) → bottleneck → decoder (×2 up + conv, twice) → 3-ch
    projection → sigmoid (or, with `residual`, input minus projection, clamped to [0, 1]).

    Inputs are float images in [0, 1] of any H, W >= SIZE_MULTIPLE; sizes that are not a
    multiple of 2 ** scales (4 by default) are reflect-padded and the output is cropped back to
    the input's size.
    """

    def __init__(self, config: AutoEncoderConfig | None = None, **overrides: object) -> None:
        super().__init__()
        if config is not None and overrides:
            raise TypeError("pass either an AutoEncoderConfig or keyword overrides, not both")
        cfg = config or AutoEncoderConfig(**overrides)  # type: ignore[arg-type]
        self.config = cfg
        b, a, act = cfg.base, cfg.in_affine, cfg.act
        self.size_multiple = 2**cfg.scales
        if cfg.stem:
            self.stem = nn.Sequential(
                *[ConvINAct(cfg.in_ch if i == 0 else b, b, 3, 1, a, act) for i in range(cfg.stem)]
            )
        self.enc1 = ConvINAct(b if cfg.stem else cfg.in_ch, b, 3, 2, a, act)
        self.enc2 = ConvINAct(b, 2 * b, 3, 2, a, act)
        deep = 2 * b
        if cfg.scales == 3:
            deep = 4 * b
            self.enc3 = ConvINAct(2 * b, deep, 3, 2, a, act)
        self.bottleneck = nn.Sequential(*[ConvINAct(deep, deep, 3, 1, a, act) for _ in range(cfg.bottleneck_depth)])
        if cfg.skips:
            if cfg.scales == 3:
                self.dec0 = create_skip_upsample(cfg.upsample, deep, 2 * b, 2 * b, a, act)
            self.dec1 = create_skip_upsample(cfg.upsample, 2 * b, b, b, a, act)
            # The full-resolution block sees the input image (and the stem's features, if any).
            self.dec2 = create_skip_upsample(cfg.upsample, b, cfg.in_ch + (b if cfg.stem else 0), b, a, act)
        else:
            if cfg.scales == 3:
                self.dec0 = create_upsample(cfg.upsample, deep, 2 * b, a, act)
            self.dec1 = create_upsample(cfg.upsample, 2 * b, b, a, act)
            self.dec2 = create_upsample(cfg.upsample, b, b, a, act)
        # With skips the projection also sees the raw input: everything else has been through
        # InstanceNorm, which has thrown away the absolute brightness the output must restore.
        proj_in = b + cfg.in_ch if cfg.skips else b
        self.proj = nn.Conv2d(proj_in, cfg.in_ch, 3, padding=1)
        if cfg.residual:
            # Start as the identity map (predicted noise = 0); training then only learns the noise.
            nn.init.zeros_(self.proj.weight)
            if self.proj.bias is not None:
                nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m, cfg = self.size_multiple, self.config
        pad_h = (m - h % m) % m
        pad_w = (m - w % m) % m
        xp = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")  # (N, C, H', W'), multiples of m
        f = self.stem(xp) if cfg.stem else xp  # full-resolution features
        if cfg.skips:
            e1 = self.enc1(f)  # (N, b, H'/2, W'/2)
            e2 = self.enc2(e1)  # (N, 2b, H'/4, W'/4)
            y = self.dec0(self.bottleneck(self.enc3(e2)), e2) if cfg.scales == 3 else self.bottleneck(e2)
            full = torch.cat([xp, f], dim=1) if cfg.stem else xp
            y = self.dec2(self.dec1(y, e1), full)  # (N, b, H', W')
            y = self.proj(torch.cat([y, xp], dim=1))
        else:
            y = self.enc2(self.enc1(f))  # (N, 2b, H'/4, W'/4)
            y = self.dec0(self.bottleneck(self.enc3(y))) if cfg.scales == 3 else self.bottleneck(y)
            y = self.dec2(self.dec1(y))  # (N, b, H', W')
            y = self.proj(y)
        # Branching on the config (a Python constant) keeps the traced graph free of control flow.
        y = torch.clamp(xp - y, 0.0, 1.0) if self.config.residual else torch.sigmoid(y)
        return y[..., :h, :w]
