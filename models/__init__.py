"""normserve model definitions (PyTorch): the GroupNorm classifier and the InstanceNorm denoiser.

The names below load on first use (PEP 562), so that torch-free modules of this package
(`normserve.models.train_args`, the `--help` of `normserve train`) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports them
    from normserve.models.autoencoder import AutoEncoderConfig, ConvINAct, SimpleIN_AutoEncoder
    from normserve.models.gncnn import GNCNN, ConvGNAct, GNCNNConfig
    from normserve.models.layers import (
        GNConfig,
        GroupNormFlex,
        StdConv2d,
        choose_gn_groups,
        create_act_layer,
        fold_weight_standardization,
        get_act_layer,
        get_conv_layer,
        get_norm_layer,
    )
    from normserve.models.registry import MODEL_KINDS, ModelSpec, build_model

_MODULES = ("autoencoder", "gncnn", "layers", "registry")
__all__ = [
    "GNCNN",
    "MODEL_KINDS",
    "AutoEncoderConfig",
    "ConvGNAct",
    "ConvINAct",
    "GNCNNConfig",
    "GNConfig",
    "GroupNormFlex",
    "ModelSpec",
    "SimpleIN_AutoEncoder",
    "StdConv2d",
    "build_model",
    "choose_gn_groups",
    "create_act_layer",
    "fold_weight_standardization",
    "get_act_layer",
    "get_conv_layer",
    "get_norm_layer",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module in _MODULES:
            found = getattr(importlib.import_module(f"{__name__}.{module}"), name, None)
            if found is not None:
                globals()[name] = found
                return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
