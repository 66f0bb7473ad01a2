"""MAE's network (He et al., "Masked Autoencoders Are Scalable Vision Learners"): the plain ViT
encoder on the visible patches only, then a light decoder over every position (the encoded
visible tokens plus one shared, learnt mask token at each hidden one) that predicts each patch's
pixels. The pixel-space control beside l-DAE and DiffMAE: no noise anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import ModelConfig
from ...markers import nvtx_range
from ...models.blocks import Block, mlp_hidden
from ...models.pos_embed import sincos_2d
from ...models.speed import apply_speed_switches
from ...models.vit import EncoderDecoder, ViTEncoder, _CheckpointedBlocks, _init_common
from ..masking import encode_visible, scatter_tokens


class MAEDecoder(_CheckpointedBlocks, nn.Module):
    def __init__(self, img_size: int, patch_size: int, enc_width: int, in_chans: int = 3, width: int = 512,
                 depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0, attn_backend: str = "auto",
                 kernels: str = "auto") -> None:
        super().__init__()
        g = img_size // patch_size
        self.num_patches = g * g
        self.embed = nn.Linear(enc_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_2d(width, g, g, cls_token=True).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, "none", attn_backend, False, kernels)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_size * patch_size * in_chans)
        _init_common(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, ctx: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """ctx: encoder tokens (B, 1 + n_keep, enc_width), class token first -> every patch's
        predicted pixels (B, N, D)."""
        x = self.embed(ctx)
        B = x.shape[0]
        full = self.mask_token.to(x.dtype).expand(B, self.num_patches, -1)
        full = scatter_tokens(full, ids_keep, x[:, 1:])
        h = torch.cat([x[:, :1], full], dim=1) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            h = blk(h, None)
        return self.head(self.norm(h[:, 1:]))


class MAEModel(EncoderDecoder):
    """(clean images, visible patch ids) -> predicted pixels of every patch (B, N, D)."""

    def forward(self, x: torch.Tensor, *, ids_keep: torch.Tensor, **cond) -> torch.Tensor:
        if cond:
            raise ValueError(f"MAEModel has no conditioning on {', '.join(sorted(cond))}")
        with nvtx_range("encoder"):
            ctx = encode_visible(self.encoder, x, ids_keep)
        with nvtx_range("decoder"):
            return self.decoder(ctx, ids_keep)


def build_mae(cfg: ModelConfig, img_size: int, in_chans: int = 3, kernels: str = "auto") -> MAEModel:
    if img_size % cfg.patch_size:
        raise ValueError(f"img_size={img_size} is not divisible by model.patch_size={cfg.patch_size}")
    enc = ViTEncoder(img_size, cfg.patch_size, in_chans, width=cfg.width, depth=cfg.encoder_depth,
                     num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, cond="none",
                     attn_backend=cfg.attn_backend, kernels=kernels)
    dec = MAEDecoder(img_size, cfg.patch_size, cfg.width, in_chans, width=cfg.decoder_width,
                     depth=cfg.decoder_depth, num_heads=cfg.decoder_heads, mlp_ratio=cfg.mlp_ratio,
                     attn_backend=cfg.attn_backend, kernels=kernels)
    model = MAEModel(enc, dec)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return apply_speed_switches(model, cfg.bf16_residual, cfg.adaln_act_dtype, cfg.fp8)


def train_flops_per_image(cfg: ModelConfig, img_size: int, mask_ratio: float, in_chans: int = 3
                          ) -> tuple[float, float]:
    """(forward, training) FLOPs per image, matmuls only (multiply-add = 2), as DiffMAE's count.

    N patches, n_keep = int(N (1 - mask_ratio)) visible, D = p^2 C, encoder width w (L_e blocks,
    T_e = 1 + n_keep tokens), decoder width v (L_d blocks over T_d = 1 + N tokens):
      forward   patch embedding 2 N D w (the strided conv embeds every patch), encoder blocks
                L_e [2 T_e w (4w + 2h) + 4 T_e^2 w], decoder embedding 2 T_e w v, decoder blocks
                L_d [2 T_d v (4v + 2h') + 4 T_d^2 v], head 2 N v D
      training  3 x forward less the image's gradient into the patch embedding (2 N D w), which
                no one asks for.
    """
    p, w, v = cfg.patch_size, cfg.width, cfg.decoder_width
    N = (img_size // p) ** 2
    keep = max(1, int(N * (1.0 - mask_ratio)))
    D = p * p * in_chans
    h, hd = mlp_hidden(w, cfg.mlp_ratio), mlp_hidden(v, cfg.mlp_ratio)
    Te, Td = 1 + keep, 1 + N
    fwd = 2 * N * D * w + cfg.encoder_depth * (2 * Te * w * (4 * w + 2 * h) + 4 * Te * Te * w)
    fwd += 2 * Te * w * v + cfg.decoder_depth * (2 * Td * v * (4 * v + 2 * hd) + 4 * Td * Td * v) + 2 * N * v * D
    return float(fwd), float(3 * fwd - 2 * N * D * w)
