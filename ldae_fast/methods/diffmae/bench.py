"""What the train-step benchmark (bench/train_step.py) measures of DiffMAE: the paper's ImageNet
shapes and decoder, and its timm peer (encoder and joint decoder of timm blocks)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...models.blocks import SigmaEmbedder
from ...models.pos_embed import sincos_2d
from ...models.vit import SIGMA_FREQ_DIM
from ..spec import BenchFlag, PeerNotApplicable, StepBench
from .config import TOPDOWN_MODES
from .flops import diffmae_train_flops_per_image
from .presets import PRESETS

FLOP_COUNT = ("ldae_fast.methods.diffmae.flops.diffmae_train_flops_per_image: forward (matmuls, 2 FLOPs per "
              "multiply-add; encoder blocks on 1 + n_keep tokens, decoder on what decoder_kind attends over, "
              "attention's quadratic terms included) + backward (2 x forward less the input gradients of the "
              "patch, noised-patch and t embeddings), equal to torch.utils.flop_counter's count; timm peer "
              "counted without adaLN")


def decoder_for(size: str) -> dict:
    """The decoder the presets train with this encoder: diffmae-demo's for tiny, MAE's 8 x 512
    (diffmae-vitb / -vitl) for the rest, read from the presets so the benchmark follows them."""
    preset = PRESETS["diffmae-demo" if size == "tiny" else "diffmae-vitb"]
    return {k: v for k, v in preset.items()
            if k in ("model.decoder_width", "model.decoder_depth", "model.decoder_heads")}


def _gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class TimmDiffMAEPeer(nn.Module):
    """DiffMAE variant (c): encoder and joint decoder stacks of timm Blocks, same widths, depths,
    heads, tokens, position embeddings and head as ours. timm's Block takes no conditioning, so
    t's embedding (the same 256 -> v -> v MLP as ours) is added to the noised tokens instead of
    adaLN: its FLOPs are diffmae_train_flops_per_image(adaln=False), slightly less work than ours.
    Called as the method calls our model: model(x, ids_keep=, ids_masked=, noisy=, t=)."""

    def __init__(self, img_size: int, patch_size: int, width: int, depth: int, num_heads: int,
                 dec_width: int, dec_depth: int, dec_heads: int, mlp_ratio: float, in_chans: int = 3) -> None:
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        g = img_size // patch_size
        D = patch_size * patch_size * in_chans
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_2d(width, g, g, cls_token=True).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.enc_proj = nn.Linear(width, dec_width)
        self.noisy_embed = nn.Linear(D, dec_width)
        self.register_buffer("decoder_pos_embed", sincos_2d(dec_width, g, g, cls_token=True).unsqueeze(0),
                             persistent=False)
        self.t_embed = SigmaEmbedder(dec_width, SIGMA_FREQ_DIM, scale=1.0)
        self.decoder_blocks = nn.ModuleList(Block(dec_width, dec_heads, mlp_ratio, qkv_bias=True)
                                            for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_width, eps=1e-6)
        self.head = nn.Linear(dec_width, D)

    def forward(self, x: torch.Tensor, *, ids_keep: torch.Tensor, ids_masked: torch.Tensor,
                noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        pos = self.pos_embed.to(x.dtype)
        h = _gather(self.patch_embed(x) + pos[:, 1:], ids_keep)
        h = torch.cat([(self.cls_token + pos[:, :1]).expand(B, -1, -1).to(h.dtype), h], dim=1)
        for blk in self.blocks:
            h = blk(h)
        ctx = self.enc_proj(self.norm(h))
        dpos = self.decoder_pos_embed.to(ctx.dtype).expand(B, -1, -1)
        ctx = ctx + torch.cat([dpos[:, :1], _gather(dpos[:, 1:], ids_keep)], dim=1)
        q = (self.noisy_embed(noisy.to(ctx.dtype)) + _gather(dpos[:, 1:], ids_masked)
             + self.t_embed(t.float()).unsqueeze(1).to(ctx.dtype))
        h = torch.cat([ctx, q], dim=1)
        for blk in self.decoder_blocks:
            h = blk(h)
        return self.head(self.decoder_norm(h[:, ctx.shape[1]:]))


def _peer(cfg) -> tuple[nn.Module, tuple[float, float]]:
    m, dm, img = cfg.model, cfg.diffmae, cfg.data.img_size
    if dm.decoder_kind != "joint":
        raise PeerNotApplicable(f"n/a: timm's Block has no cross-attention (decoder_kind={dm.decoder_kind})")
    net = TimmDiffMAEPeer(img, m.patch_size, m.width, m.encoder_depth, m.num_heads, m.decoder_width,
                          m.decoder_depth, m.decoder_heads, m.mlp_ratio)
    return net, diffmae_train_flops_per_image(m, dm, img, adaln=False)


def _row(cfg) -> dict:
    dm, stored = cfg.diffmae, cfg.model.__dict__
    return {"mask_ratio": dm.mask_ratio, "decoder_kind": dm.decoder_kind, "decoder_topdown": dm.decoder_topdown,
            "decoder": f"{cfg.model.decoder_depth} x {stored['decoder_width'] or 'enc'}"}


# The supplement's ImageNet setting (224 px, patch 16, ViT-B and ViT-L); latent_dim is unused (pixels).
GPU_DEFAULTS = {"sizes": "B,L", "batch_sizes": "256", "img_size": 224}


def step_bench() -> StepBench:
    return StepBench(
        label="DiffMAE ", gpu_defaults=GPU_DEFAULTS, variants="a,c,d",
        flags={"mask_ratio": BenchFlag("diffmae.mask_ratio", 0.75, "fraction of patches hidden from the encoder"),
               "decoder_topdown": BenchFlag("diffmae.decoder_topdown", "last",
                                            "diffmae.decoder_topdown, which encoder block each cross-attending "
                                            "decoder block reads (the DiffMAE presets: deepest_first)",
                                            choices=TOPDOWN_MODES),
               "decoder_kind": BenchFlag("diffmae.decoder_kind", "joint",
                                         "diffmae.decoder_kind, joint / cross / cross_self (the timm peer exists "
                                         "for joint only)")},
        overrides=decoder_for, peer=_peer, row=_row, flop_count=FLOP_COUNT)
