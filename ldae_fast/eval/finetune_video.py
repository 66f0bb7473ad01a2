"""The clip classifier a video checkpoint fine-tunes as: our clip encoder (tubelet embedding,
spacetime positions, the ViT blocks) with stochastic depth in its blocks, then the supplement's
head: global average pool of the patch tokens, a fresh LayerNorm, dropout, a linear layer.

timm has no clip ViT, so the encoder stays ours; it exposes timm's parameter-group interface
(`group_matcher`, `no_weight_decay`), so layer-wise lr decay comes from timm's
param_groups_layer_decay as it does for the image ViT: the class token and the tubelet
embedding are layer 0, block i is layer i + 1 (the final norm goes with the last block), the
fresh norm and the head are the last layer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class _Branch(nn.Module):
    """A residual branch followed by DropPath: the block adds `x + DropPath(branch(.))`, so the
    whole branch is dropped per sample, as in timm's ViT."""

    def __init__(self, inner: nn.Module, rate: float) -> None:
        super().__init__()
        from timm.layers import DropPath

        self.inner = inner
        self.drop = DropPath(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.inner(x))


def add_drop_path(blocks: nn.ModuleList, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to `rate` over the blocks (DeiT's rule), around
    each plain (cond='none') block's attention and MLP branch."""
    n = len(blocks)
    for i, blk in enumerate(blocks):
        r = rate * i / max(n - 1, 1)
        if r > 0:
            blk.attn = _Branch(blk.attn, r)
            blk.mlp = _Branch(blk.mlp, r)


class ClipClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, drop_path: float = 0.2, dropout: float = 0.5,
                 head_init_std: float = 2e-5, seed: int = 0) -> None:
        super().__init__()
        if getattr(encoder, "cond", "none") != "none":
            raise ValueError("a clip encoder fine-tunes only unconditioned (cond='none') blocks")
        self.encoder = copy.deepcopy(encoder)
        add_drop_path(self.encoder.blocks, drop_path)
        self.num_features = self.embed_dim = encoder.embed_dim
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.embed_dim, num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(x)
        pooled = tokens[:, self.encoder.num_prefix_tokens:].mean(dim=1)
        return self.head(self.head_drop(self.fc_norm(pooled)))

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^encoder\.(?:cls_token|patch_embed)",
                    blocks=[(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (99999,))])

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token"}


__all__ = ["ClipClassifier", "add_drop_path"]
