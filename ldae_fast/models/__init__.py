"""ViT encoder / decoder with DiT-style adaLN-Zero blocks, and their export to timm."""

from .blocks import Attention, Block, FinalLayer, Mlp, PatchEmbed, SigmaEmbedder
from .pos_embed import sincos_2d
from .timm_export import timm_kwargs, timm_state_dict, to_timm
from .vit import (
    LDAEModel,
    ViTDecoder,
    ViTEncoder,
    build_encoder,
    build_model,
    flops_per_image,
    param_count,
)

__all__ = [
    "Attention", "Block", "FinalLayer", "LDAEModel", "Mlp", "PatchEmbed", "SigmaEmbedder",
    "ViTDecoder", "ViTEncoder", "build_encoder", "build_model", "flops_per_image", "param_count",
    "sincos_2d", "timm_kwargs", "timm_state_dict", "to_timm",
]
