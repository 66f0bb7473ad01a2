"""What the train-step benchmark (bench/train_step.py) measures of l-DAE: the paper's layout by
default, and its timm peer, the same encoder-decoder assembled from timm blocks."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ...reference import unpatchify
from ..spec import BenchFlag, StepBench
from .flops import train_flops_per_image

FLOP_COUNT = ("training = 3 x forward; forward = ldae_fast.methods.ldae.model.flops_per_image (matmuls, "
              "2 FLOPs per multiply-add, N tokens with layout 'dit' (N + 1 and a decoder embedding with "
              "'mae'), adaLN included); timm peer counted with cond='none'")


class TimmPeer(nn.Module):
    """Variant (c): the l-DAE encoder-decoder assembled from timm parts (PatchEmbed, Block).

    Same widths, depths, heads, tokens and output head as ours with cond='none', so its analytic
    FLOPs are flops_per_image(cond='none'). timm's Block takes no conditioning, so the peer gets no
    noise level: it does slightly less work than ours (no adaLN), which favours the peer.
    layout 'dit' (the paper's): one sequence of N patch tokens through all blocks, nothing between
    the halves; 'mae': a class token, a LayerNorm and a decoder embedding between them.
    """

    def __init__(self, img_size: int, patch_size: int, width: int, encoder_depth: int,
                 decoder_depth: int, num_heads: int, mlp_ratio: float, in_chans: int = 3,
                 layout: str = "dit") -> None:
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, width)
        cls = layout == "mae"  # the MAE-shaped layout's class token and halves
        self.prefix = 1 if cls else 0
        n = self.patch_embed.num_patches + self.prefix
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cls else None
        self.pos_embed = nn.Parameter(torch.randn(1, n, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, qkv_bias=True)
                                    for _ in range(encoder_depth))
        self.norm = nn.LayerNorm(width, eps=1e-6) if cls else nn.Identity()
        self.decoder_embed = nn.Linear(width, width) if cls else nn.Identity()
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, n, width) * 0.02) if cls else None
        self.decoder_blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, qkv_bias=True)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, patch_size * patch_size * in_chans)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        t = self.patch_embed(x)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1).to(t.dtype), t], dim=1)
        t = t + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        t = self.decoder_embed(self.norm(t))
        if self.decoder_pos_embed is not None:
            t = t + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            t = blk(t)
        patches = self.head(self.decoder_norm(t)[:, self.prefix:])
        return unpatchify(patches, self.patch_size, self.img_size, self.img_size, self.in_chans)


def _peer(cfg) -> tuple[nn.Module, tuple[float, float]]:
    m, img = cfg.model, cfg.data.img_size
    net = TimmPeer(img, m.patch_size, m.width, m.encoder_depth, m.decoder_depth, m.num_heads, m.mlp_ratio,
                   layout=cfg.ldae.layout)
    return net, train_flops_per_image(m, dataclasses.replace(cfg.ldae, cond="none"), img)


def _tokens(cfg) -> int:
    return cfg.num_patches + (1 if cfg.ldae.layout == "mae" else 0)


def _row(cfg) -> dict:
    return {"layout": cfg.ldae.layout, "tokens": _tokens(cfg), "d": cfg.tokenizer.latent_dim}


def step_bench() -> StepBench:
    return StepBench(
        flags={"layout": BenchFlag("ldae.layout", "dit", "l-DAE network layout (ldae.layout): 'dit', the "
                                   "paper's, N tokens; 'mae' adds a class token (N + 1)", choices=("dit", "mae"))},
        peer=_peer, row=_row, tokens=_tokens, tokenizer=True, flop_count=FLOP_COUNT, targets=True)
