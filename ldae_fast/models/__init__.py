"""Shared network parts: ViT encoder / decoder with DiT-style adaLN-Zero blocks, and their export to
timm. Each method's own network lives with the method (methods/<name>/model.py)."""

from .blocks import Attention, Block, FinalLayer, Mlp, PatchEmbed, SigmaEmbedder
from .pos_embed import sincos_2d
from .timm_export import timm_kwargs, timm_state_dict, to_timm
from .vit import EncoderDecoder, ViTDecoder, ViTEncoder

__all__ = [
    "Attention", "Block", "EncoderDecoder", "FinalLayer", "Mlp", "PatchEmbed", "SigmaEmbedder",
    "ViTDecoder", "ViTEncoder", "sincos_2d", "timm_kwargs", "timm_state_dict", "to_timm",
]
