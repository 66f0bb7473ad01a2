"""DiffMAE's network: a ViT encoder over the visible patches and a diffusion decoder that denoises
the masked ones.

Encoder: the plain ViT of vit.py (cond='none': affine pre-norm blocks, class token, fixed 2-D
sin-cos position embedding, final LayerNorm), run on the visible patches only; the same module
evaluates whole images, so the probe, kNN, fine-tune and timm export take it unchanged. Then a
linear projection to the decoder width (the LayerNorm before it is the encoder's own `norm`).

Decoder: the masked patches, noised by the forward process, are embedded by their own linear
map (the clean visible ones went through the encoder's patch embedding), get the decoder's fixed
position embedding and are conditioned on the step t through adaLN-Zero. Three layouts behind
`kind`:
  joint       self-attention over [encoder tokens, noised tokens] together (a vanilla ViT decoder);
  cross       the noised tokens cross-attend to the encoder tokens, no attention among themselves;
  cross_self  cross-attention to the encoder, then self-attention among the noised tokens.
What the cross-attending blocks read is `topdown` (diffmae.decoder_topdown, TOPDOWN_MODES):
  last           every block reads the encoder's final output (after its norm);
  deepest_first  block i reads encoder block L_e-1-i (clamped at block 0), the top-down wiring of
                 DiffMAE's Fig. 3 (encoder blocks connected to decoder blocks deepest first);
  spread         block i reads encoder block L_e-1-floor(i L_e / L_d): deepest first, spaced
                 evenly over the whole encoder when the decoder is shallower (equal depths: the
                 same as deepest_first).
In the top-down modes each decoder block has its own linear projection of what it reads (and a
LayerNorm of its own for an inner block; the final block's output already passed the encoder's
norm), because blocks at different depths carry differently scaled features.
The output is the clean pixels of each masked patch, (B, n_masked, p*p*C), in patchify's order.

Video (model.num_frames > 0): spacetime patches of diffmae.tubelet x p x p, numbered time-major
(n = t' * g^2 + row * g + col). The encoder's patch embedding is a Conv3d over the tubelet (a
linear map of the flattened tubelet); the decoder embeds and predicts one p x p time slice of
each tubelet (p*p*C values, the same as an image patch). Both position embeddings are fixed and
separable: the first 3/4 of the channels carry MAE's 2-D sin-cos code of the patch's (row, col),
the last 1/4 a 1-D sin-cos code of its tubelet index t' (concatenated, not summed, so no space
and time code can cancel).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ...config import ModelConfig
from ...kernels.attention import attention, resolve_backend
from ...kernels.modules import AdaLNLayerNorm
from ...markers import nvtx_range
from ...models.blocks import (
    LN_EPS,
    Attention,
    Block,
    FinalLayer,
    Mlp,
    SigmaEmbedder,
    mlp_hidden,
)
from ...models.pos_embed import sincos_1d, sincos_2d
from ...models.speed import apply_speed_switches
from ...models.vit import (
    SIGMA_FREQ_DIM,
    EncoderDecoder,
    ViTEncoder,
    _CheckpointedBlocks,
    _init_common,
)
from ..masking import encode_visible
from ..masking import gather_tokens as _gather
from .config import DECODER_KINDS, TOPDOWN_MODES, DiffMAEConfig


def topdown_sources(mode: str, encoder_depth: int, decoder_depth: int) -> tuple[int, ...]:
    """The encoder block each decoder block reads (0-based), for diffmae.decoder_topdown=mode."""
    if mode not in TOPDOWN_MODES:
        raise ValueError(f"decoder_topdown={mode!r}; choose one of {', '.join(TOPDOWN_MODES)}")
    last = encoder_depth - 1
    if mode == "last":
        return (last,) * decoder_depth
    if mode == "deepest_first":
        return tuple(max(last - i, 0) for i in range(decoder_depth))
    return tuple(last - (i * encoder_depth) // decoder_depth for i in range(decoder_depth))


def sincos_spacetime(dim: int, time_grid: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """(time_grid * grid^2 [+1], dim) fixed embedding, time-major; a zero row first for the
    class token. Channels: [2-D sin-cos of (row, col) | 1-D sin-cos of t'], 3/4 and 1/4."""
    dim_t = dim // 16 * 4
    if dim % 4 or dim_t == 0:
        raise ValueError(f"a spacetime position embedding needs a width >= 16 divisible by 4, got {dim}")
    space = sincos_2d(dim - dim_t, grid, grid)  # (g^2, dim - dim_t)
    time = sincos_1d(dim_t, torch.arange(time_grid))  # (T', dim_t)
    emb = torch.cat([space.repeat(time_grid, 1), time.repeat_interleave(grid * grid, dim=0)], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)
    return emb


class TubeletEmbed(nn.Module):
    """(B, C, T, H, W) clips -> (B, T/tubelet * g^2, width) tokens, time-major, by a strided
    Conv3d (kernel = stride = (tubelet, p, p)): a linear map of each flattened tubelet."""

    def __init__(self, img_size: int, patch_size: int, tubelet: int, num_frames: int, in_chans: int,
                 dim: int) -> None:
        super().__init__()
        if img_size % patch_size or num_frames % tubelet:
            raise ValueError(f"clip {num_frames}x{img_size}x{img_size} is not divisible into "
                             f"{tubelet}x{patch_size}x{patch_size} tubelets")
        self.img_size, self.patch_size, self.tubelet, self.num_frames = img_size, patch_size, tubelet, num_frames
        self.grid_size = img_size // patch_size
        self.time_grid = num_frames // tubelet
        self.num_patches = self.time_grid * self.grid_size ** 2
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=(tubelet, patch_size, patch_size),
                              stride=(tubelet, patch_size, patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or tuple(x.shape[2:]) != (self.num_frames, self.img_size, self.img_size):
            raise ValueError(f"input is {tuple(x.shape)}; this model was built for clips (B, C, "
                             f"{self.num_frames}, {self.img_size}, {self.img_size})")
        return self.proj(x).flatten(2).transpose(1, 2)


class CrossAttention(nn.Module):
    """Queries from x (B, N, C), keys and values from ctx (B, M, C), through the kernels'
    attention function (which takes M != N)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.backend = resolve_backend(backend)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        M = ctx.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(ctx).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, kv[0], kv[1], backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossBlock(nn.Module):
    """adaLN-Zero block for the noised tokens: cross-attention to the context, optionally
    self-attention among the tokens, then the MLP; every branch gated from t's embedding."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, self_attn: bool = False,
                 backend: str = "auto", fused_adaln: bool = False, kernels: str = "auto") -> None:
        super().__init__()
        self.branches = 3 if self_attn else 2
        self.norm_ctx = nn.LayerNorm(dim, eps=LN_EPS)
        self.cross = CrossAttention(dim, num_heads, backend)
        if self_attn:
            self.attn = Attention(dim, num_heads, backend)
        self.mlp = Mlp(dim, mlp_hidden(dim, mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * self.branches * dim))
        self.norm_modulate = AdaLNLayerNorm(LN_EPS, fused_adaln, kernels)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, ctx, c, use_reentrant=False)
        return self._forward(x, ctx, c)

    def _forward(self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mods = self.adaLN_modulation(c).chunk(3 * self.branches, dim=-1)
        sh, sc, g = mods[0:3]
        x = x + g.unsqueeze(1) * self.cross(self.norm_modulate(x, sh, sc),
                                            self.norm_ctx(ctx))
        if self.branches == 3:
            sh, sc, g = mods[3:6]
            x = x + g.unsqueeze(1) * self.attn(self.norm_modulate(x, sh, sc))
        sh, sc, g = mods[-3:]
        return x + g.unsqueeze(1) * self.mlp(self.norm_modulate(x, sh, sc))


class DiffMAEDecoder(_CheckpointedBlocks, nn.Module):
    def __init__(self, img_size: int, patch_size: int, enc_width: int, in_chans: int = 3, width: int = 512,
                 depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0, kind: str = "joint",
                 attn_backend: str = "auto", fused_adaln: bool = False, kernels: str = "auto",
                 time_grid: int = 0, topdown: str = "last", encoder_depth: int = 1) -> None:
        """time_grid: tubelets along time for clips (0: images). topdown, encoder_depth: which
        encoder block each block reads (topdown_sources); 'last' is the only choice for joint."""
        super().__init__()
        if kind not in DECODER_KINDS:
            raise ValueError(f"decoder kind={kind!r}; choose one of {', '.join(DECODER_KINDS)}")
        if kind == "joint" and topdown != "last":
            raise ValueError(f"decoder_topdown={topdown!r} needs a cross or cross_self decoder "
                             "(the joint decoder updates the encoder tokens it reads)")
        self.kind, self.patch_size, self.in_chans = kind, patch_size, in_chans
        self.topdown = topdown
        self.sources = topdown_sources(topdown, encoder_depth, depth)
        g = img_size // patch_size
        D = patch_size * patch_size * in_chans
        if topdown == "last":
            self.enc_proj = nn.Linear(enc_width, width)
        else:
            last = encoder_depth - 1
            self.ctx_norms = nn.ModuleList(
                nn.Identity() if j == last else nn.LayerNorm(enc_width, eps=LN_EPS) for j in self.sources)
            self.ctx_projs = nn.ModuleList(nn.Linear(enc_width, width) for _ in self.sources)
        self.noisy_embed = nn.Linear(D, width)
        pos = sincos_spacetime(width, time_grid, g) if time_grid else sincos_2d(width, g, g, cls_token=True)
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        self.t_embed = SigmaEmbedder(width, SIGMA_FREQ_DIM, scale=1.0)
        if kind == "joint":
            self.blocks = nn.ModuleList(
                Block(width, num_heads, mlp_ratio, "adaln", attn_backend, fused_adaln, kernels) for _ in range(depth))
        else:
            self.blocks = nn.ModuleList(
                CrossBlock(width, num_heads, mlp_ratio, kind == "cross_self", attn_backend, fused_adaln, kernels)
                for _ in range(depth))
        self.final_layer = FinalLayer(width, D, "adaln", fused_adaln, kernels)
        _init_common(self)
        for m in self.modules():
            if isinstance(m, CrossBlock):
                nn.init.zeros_(m.adaLN_modulation[-1].weight)
                nn.init.zeros_(m.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def encoder_blocks_read(self) -> tuple[int, ...]:
        """The encoder blocks whose outputs `forward` needs (encode_visible's keep_blocks); empty
        when every block reads the final output only."""
        return () if self.topdown == "last" else tuple(sorted(set(self.sources)))

    def forward(self, ctx: torch.Tensor | tuple, ids_keep: torch.Tensor, ids_masked: torch.Tensor,
                noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ctx: encoder tokens (B, 1 + n_keep, enc_width) with the class token first, or with a
        top-down wiring encode_visible's tuple of block outputs (keep_blocks=encoder_blocks_read);
        noisy: the masked patches at step t, (B, n_masked, D); t: (B,) integer steps ->
        (B, n_masked, D)."""
        if self.topdown == "last":
            src_dtype, projected = ctx.dtype, [self.enc_proj(ctx)]
        elif torch.is_tensor(ctx):
            raise ValueError(f"decoder_topdown={self.topdown!r} reads encoder blocks "
                             f"{self.encoder_blocks_read}: pass encode_visible's tuple of block outputs")
        else:
            src_dtype = ctx[self.sources[0]].dtype
            projected = [proj(norm(ctx[j])) for j, norm, proj in zip(self.sources, self.ctx_norms, self.ctx_projs)]
        # dtypes as the decoder has always had them: the position codes in the encoder output's
        # dtype, the noised tokens in the dtype of (projected context + position code).
        pos = self.pos_embed.to(src_dtype)
        B = projected[0].shape[0]
        pos_vis = torch.cat([pos[:, :1].expand(B, -1, -1), _gather(pos[:, 1:].expand(B, -1, -1), ids_keep)], 1)
        ctxs = [p + pos_vis for p in projected]
        x = self.noisy_embed(noisy.to(ctxs[0].dtype)) + _gather(pos[:, 1:].expand(B, -1, -1), ids_masked)
        c = self.t_embed(t.float())
        if self.topdown != "last":
            for blk, ctx_i in zip(self.blocks, ctxs):
                x = blk(x, ctx_i, c)
            return self.final_layer(x, c)
        ctx = ctxs[0]
        if self.kind == "joint":
            n_ctx = ctx.shape[1]
            h = torch.cat([ctx, x], dim=1)
            for blk in self.blocks:
                h = blk(h, c)
            x = h[:, n_ctx:]
        else:
            for blk in self.blocks:
                x = blk(x, ctx, c)
        return self.final_layer(x, c)


class DiffMAEModel(EncoderDecoder):
    """(clean images, mask, noised masked patches, t) -> predicted clean masked patches.

    The conditioning travels as keyword arguments (DiT's model_kwargs): the method calls
    `model(x, ids_keep=..., ids_masked=..., noisy=..., t=...)`. `encode` / `decode` split the two
    halves for the sampler, which encodes once and decodes at every step.
    """

    def encode(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor | tuple:
        """What `decode` reads: the final output, or every block output the decoder's top-down
        wiring reads."""
        return encode_visible(self.encoder, x, ids_keep, self.decoder.encoder_blocks_read)

    def decode(self, ctx, ids_keep, ids_masked, noisy, t) -> torch.Tensor:
        return self.decoder(ctx, ids_keep, ids_masked, noisy, t)

    def forward(self, x: torch.Tensor, *, ids_keep: torch.Tensor, ids_masked: torch.Tensor,
                noisy: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if cond:
            raise ValueError(f"DiffMAEModel has no conditioning on {', '.join(sorted(cond))}")
        with nvtx_range("encoder"):
            ctx = self.encode(x, ids_keep)
        with nvtx_range("decoder"):
            return self.decode(ctx, ids_keep, ids_masked, noisy, t)



def _make_video_encoder(enc: ViTEncoder, cfg: ModelConfig, tubelet: int, img_size: int, in_chans: int) -> None:
    """Turn the image ViT into the clip encoder: tubelet embedding and spacetime positions; the
    blocks, class token and norm stay the ViT's."""
    emb = TubeletEmbed(img_size, cfg.patch_size, tubelet, cfg.num_frames, in_chans, cfg.width)
    w = emb.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(emb.proj.bias)
    enc.patch_embed = emb
    enc.num_patches = emb.num_patches
    enc.register_buffer("pos_embed", sincos_spacetime(cfg.width, emb.time_grid, emb.grid_size).unsqueeze(0)
                        .to(enc.cls_token.device), persistent=False)


def build_diffmae(cfg: ModelConfig, dm: DiffMAEConfig, img_size: int, in_chans: int = 3,
                  kernels: str = "auto") -> DiffMAEModel:
    """DiffMAE's network from the shared model section `cfg` and DiffMAE's own `dm` (its decoder's
    kind and wiring, the tubelet of clips)."""
    if img_size % cfg.patch_size:
        raise ValueError(f"img_size={img_size} is not divisible by model.patch_size={cfg.patch_size}")
    enc = ViTEncoder(img_size, cfg.patch_size, in_chans, width=cfg.width, depth=cfg.encoder_depth,
                     num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, cond="none",
                     attn_backend=cfg.attn_backend, kernels=kernels)
    time_grid = 0
    if cfg.num_frames:
        _make_video_encoder(enc, cfg, dm.tubelet, img_size, in_chans)
        time_grid = cfg.num_frames // dm.tubelet
    dec = DiffMAEDecoder(img_size, cfg.patch_size, cfg.width, in_chans, width=cfg.decoder_width,
                         depth=cfg.decoder_depth, num_heads=cfg.decoder_heads, mlp_ratio=cfg.mlp_ratio,
                         kind=dm.decoder_kind, attn_backend=cfg.attn_backend, fused_adaln=cfg.fused_adaln,
                         kernels=kernels, time_grid=time_grid, topdown=dm.decoder_topdown,
                         encoder_depth=cfg.encoder_depth)
    model = DiffMAEModel(enc, dec)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return apply_speed_switches(model, cfg.bf16_residual, cfg.adaln_act_dtype, cfg.fp8)


def flops_per_image(cfg: ModelConfig, dm: DiffMAEConfig, img_size: int, in_chans: int = 3,
                    mask_ratio: float | None = None) -> float:
    """Analytic forward FLOPs of one image (multiply-add = 2), matmuls only, as vit.flops_per_image.

    Clips: N = (T / tubelet) g^2 spacetime patches, the embedding maps tubelet p^2 C values, the
    noised input and the head one time slice (D = p^2 C).
    Encoder on T_e = 1 + n_keep tokens (width w, L_e blocks); decoder width v, L_d blocks, over
    T_c = 1 + n_keep context and M = N - n_keep noised tokens:
      encoder blocks  L_e [2 T_e w (4w + 2h) + 4 T_e^2 w], patch embedding 2 N (p^2 C) w (the
                      strided conv embeds every patch, then the visible ones are gathered)
      projections     P 2 T_c w v (encoder -> decoder; P = 1, or L_d with a top-down wiring, one per
                      decoder block), 2 M D v (noised patches), 2 M v D (head)
      joint           L_d [2 T v (4v + 2h') + 4 T^2 v] with T = T_c + M
      cross           L_d [2 M v (2v + 2h') + 2 T_c v (2v) + 4 M T_c v]   (q, proj; kv; attention)
      cross_self      cross + L_d [2 M v (4v) + 4 M^2 v]
      per image       adaLN maps 2 v (k v) per block (k = 6 joint, 6 cross, 9 cross_self), 2 v (2v)
                      the final layer's, 2 (256 v + v^2) the t embedding
    mask_ratio None: dm.mask_ratio.
    """
    mask_ratio = dm.mask_ratio if mask_ratio is None else mask_ratio
    p, w, v = cfg.patch_size, cfg.width, cfg.decoder_width
    N = (img_size // p) ** 2 * (cfg.num_frames // dm.tubelet if cfg.num_frames else 1)
    keep = max(1, int(N * (1.0 - mask_ratio)))  # masking.num_visible's rounding
    M, Te = N - keep, keep + 1
    h, hd = mlp_hidden(w, cfg.mlp_ratio), mlp_hidden(v, cfg.mlp_ratio)
    D = p * p * in_chans
    D_in = D * (dm.tubelet if cfg.num_frames else 1)  # a clip's tubelet, a slice decoded
    f = cfg.encoder_depth * (2 * Te * w * (4 * w + 2 * h) + 4 * Te * Te * w) + 2 * N * D_in * w
    n_proj = 1 if dm.decoder_topdown == "last" else cfg.decoder_depth
    f += n_proj * 2 * Te * w * v + 2 * M * D * v + 2 * M * v * D
    if dm.decoder_kind == "joint":
        T = Te + M
        f += cfg.decoder_depth * (2 * T * v * (4 * v + 2 * hd) + 4 * T * T * v)
    else:
        blk = 2 * M * v * (2 * v + 2 * hd) + 2 * Te * v * 2 * v + 4 * M * Te * v
        if dm.decoder_kind == "cross_self":
            blk += 2 * M * v * 4 * v + 4 * M * M * v
        f += cfg.decoder_depth * blk
    k = 9 if dm.decoder_kind == "cross_self" else 6
    f += cfg.decoder_depth * 2 * v * k * v + 2 * v * 2 * v + 2 * (SIGMA_FREQ_DIM * v + v * v)
    return float(f)


__all__ = ["CrossAttention", "CrossBlock", "DECODER_KINDS", "DiffMAEDecoder", "DiffMAEModel", "TOPDOWN_MODES",
           "TubeletEmbed", "build_diffmae", "encode_visible", "flops_per_image", "sincos_spacetime",
           "topdown_sources"]
