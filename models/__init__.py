"""normserve model definitions (PyTorch): the GroupNorm classifier and the InstanceNorm denoiser."""

from models.autoencoder import AutoEncoderConfig, ConvINAct, SimpleIN_AutoEncoder
from models.gncnn import GNCNN, ConvGNAct, GNCNNConfig
from models.layers import (
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
from models.registry import MODEL_KINDS, ModelSpec, build_model

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
