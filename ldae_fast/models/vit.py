"""A ViT encoder and a ViT decoder made of DiT-style blocks, shared by the methods: l-DAE joins
them (methods/ldae/model.py), DiffMAE and MAE build on the encoder. Two layouts (ldae.layout;
docs/model.md):

'dit', the paper's (l-DAE App. A: DiT-L cut in two): patch embedding + fixed 2-D sin-cos position
embedding -> encoder blocks -> decoder blocks -> final layer, one token sequence throughout: no
class token, nothing between the halves (no LayerNorm, no embedding), one sigma embedder whose
conditioning vector c (width methods/ldae/config.py cond_width: width/4 unless ldae.adaln_dim says) every
block of both halves reads. The encoder owns the embedder, so it stays self-contained for
evaluation; its features are the mean of its output tokens (the paper's probe: average pool, then
a BatchNorm without affine).

'mae', MAE-shaped halves: the encoder adds a class token and ends in an affine
LayerNorm (MAE's encoder); the decoder re-embeds the encoder tokens with a linear map (MAE's
decoder_embed: the encoder output is normalised, the decoder gets to re-scale it) plus its own
position embedding; each half has its own sigma embedder and c is full width.

Either way: -> final layer to p*p*C pixels per patch -> unpatchify (MAE's (p, p, C) order) to an
image (or latent tokens), conditioned on sigma through adaLN-Zero (cond='adaln') or not at all
(cond='none'). Encoder parameter names are timm's VisionTransformer names, so it loads into timm
for evaluation (see timm_export.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..reference import unpatchify
from .blocks import LN_EPS, Block, FinalLayer, PatchEmbed, SigmaEmbedder, TokenEmbed
from .pos_embed import sincos_2d

SIGMA_FREQ_DIM = 256


def _sigma_vector(sigma, batch: int, ref: torch.Tensor) -> torch.Tensor:
    """None (clean input), a number, a 0-d or a (B,) tensor -> a float32 (B,) tensor on ref's device."""
    if sigma is None:
        return torch.zeros(batch, device=ref.device)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=ref.device)
    if sigma.dim() == 0:
        return sigma.expand(batch)
    if sigma.numel() != batch:
        raise ValueError(f"sigma has {sigma.numel()} values for a batch of {batch}")
    return sigma.reshape(batch)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    for blk in blocks:
        x = blk(x, c)
    return x


class _CheckpointedBlocks:
    """Activation checkpointing of a stack's `blocks`: the blocks hold the switch (the
    checkpoint sits inside Block.forward), the stack only sets and reports it."""

    blocks: nn.ModuleList

    @property
    def grad_checkpointing(self) -> bool:
        return any(blk.grad_checkpointing for blk in self.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for blk in self.blocks:
            blk.grad_checkpointing = bool(enable)


def _init_linear_xavier(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _init_common(module: nn.Module) -> None:
    """Xavier-uniform everywhere, then DiT's exceptions: sigma MLP N(0, 0.02), adaLN-Zero."""
    module.apply(_init_linear_xavier)
    for m in module.modules():
        if isinstance(m, SigmaEmbedder):
            for lin in (m.mlp[0], m.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        if isinstance(m, (Block, FinalLayer)) and hasattr(m, "adaLN_modulation"):
            # adaLN-Zero: every gate starts at 0, so each block starts as the identity map.
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)


class LabelEmbedder(nn.Module):
    """Class label (B,) -> (B, dim), DiT's: one row per class plus a last, null row that a dropped
    or absent label maps to."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels, batch: int, ref: torch.Tensor) -> torch.Tensor:
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=ref.device)
        return self.table(labels.to(ref.device).long().reshape(batch))


def _add_label(c: torch.Tensor | None, embedder: LabelEmbedder | None, labels, batch: int,
               ref: torch.Tensor) -> torch.Tensor | None:
    if embedder is None:
        if labels is not None:
            raise ValueError("the model was built without class conditioning (ldae.class_cond) but got labels")
        return c
    return c + embedder(labels, batch, ref)


LAYOUTS = ("dit", "mae")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; choose one of {', '.join(LAYOUTS)}")


class ViTEncoder(_CheckpointedBlocks, nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int = 3, width: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, cond: str = "adaln",
                 attn_backend: str = "auto", fused_adaln: bool = False, kernels: str = "auto",
                 num_classes: int = 0, latent_in: int = 0, layout: str = "mae", cond_dim: int = 0) -> None:
        super().__init__()
        _check_layout(layout)
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.depth, self.num_heads, self.mlp_ratio, self.cond = depth, num_heads, mlp_ratio, cond
        self.num_features = self.embed_dim = width
        self.latent_in = latent_in
        """> 0: the encoder takes (B, N, latent_in) latent tokens, not images."""
        self.layout = layout
        self.cond_dim = cond_dim or width
        """Width of the conditioning vector c the blocks read (and the sigma embedder returns)."""
        mae = layout == "mae"
        self.num_prefix_tokens = 1 if mae else 0
        """Tokens before the patch tokens in forward_features' output (the class token)."""

        self.patch_embed = (TokenEmbed(img_size, patch_size, latent_in, width) if latent_in
                            else PatchEmbed(img_size, patch_size, in_chans, width))
        g = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if mae else None
        # Fixed, so not saved: rebuilt from the config, and checkpoints hold learned tensors only.
        self.register_buffer("pos_embed", sincos_2d(width, g, g, cls_token=mae).unsqueeze(0),
                             persistent=False)
        self.sigma_embed = SigmaEmbedder(self.cond_dim, SIGMA_FREQ_DIM) if cond == "adaln" else None
        self.label_embed = LabelEmbedder(num_classes, self.cond_dim) if num_classes else None
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, cond, attn_backend, fused_adaln, kernels, self.cond_dim)
            for _ in range(depth))
        # Affine and unconditioned even with adaLN: the features must not depend on a sigma that
        # evaluation does not have, and timm's `norm` is a plain LayerNorm. DiT cut in two has
        # no norm here: its decoder reads the encoder's block output as it is.
        self.norm = nn.LayerNorm(width, eps=LN_EPS) if mae else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        _init_common(self)
        w = self.patch_embed.proj.weight
        # A patch embedding is a linear map of the flattened patch: initialise it as one.
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def embed_sigma(self, sigma, batch: int, ref: torch.Tensor, labels=None) -> torch.Tensor | None:
        """The conditioning vector c (B, cond_dim) for noise level sigma (and class labels, with
        class conditioning: None is the null class); None when cond='none'."""
        if self.sigma_embed is None:
            return None
        return _add_label(self.sigma_embed(_sigma_vector(sigma, batch, ref)), self.label_embed, labels,
                          batch, ref)

    def embed(self, x: torch.Tensor, sigma=None, labels=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H, W) -> (tokens before the first block, c): what `encode` runs the blocks on."""
        B = x.shape[0]
        pos = self.pos_embed.to(x.dtype)
        p = self.num_prefix_tokens
        tokens = self.patch_embed(x) + pos[:, p:]
        if self.cls_token is not None:
            cls = (self.cls_token + pos[:, :1]).expand(B, -1, -1)
            tokens = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
        return tokens, self.embed_sigma(sigma, B, x, labels)

    def encode(self, x: torch.Tensor, sigma=None, labels=None,
               depth: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H, W) -> (tokens after the blocks, before the final norm; c), c the conditioning
        vector the blocks read (None with cond='none'): what the 'dit' decoder continues from."""
        tokens, c = self.embed(x, sigma, labels)
        blocks = self.blocks if not depth else self.blocks[:depth]
        return _run_blocks(blocks, tokens, c), c

    def forward_features(self, x: torch.Tensor, sigma=None, labels=None, depth: int = 0) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_prefix_tokens + N, width) tokens after the final norm (layout
        'mae': class token first; 'dit': the N patch tokens, no norm).

        sigma: (B,) noise levels of x; None means a clean image (sigma = 0). depth: run only the
        first `depth` blocks before the norm (0: all), for probing inside the encoder.
        """
        return self.norm(self.encode(x, sigma, labels, depth)[0])

    forward = forward_features

    def pooled(self, x: torch.Tensor, pool: str = "avg", sigma=None, depth: int = 0) -> torch.Tensor:
        """(B, width) image features: mean of the patch tokens (MAE's linear probe, l-DAE's) or the
        class token (layout 'mae' only)."""
        self._check_pool(pool)
        return self.pool_tokens(self.encode(x, sigma, depth=depth)[0], pool)

    def _check_pool(self, pool: str) -> None:
        if pool not in ("avg", "cls"):
            raise ValueError(f"pool={pool!r}; choose 'avg' or 'cls'")
        if pool == "cls" and self.cls_token is None:
            raise ValueError(f"pool='cls' needs a class token; ldae.layout={self.layout!r} has none "
                             "(use pool='avg')")

    def pool_tokens(self, tokens: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        """Block output (before the final norm) -> (B, width): the final norm, then the mean of the
        patch tokens or the class token; what `pooled` reads after any number of blocks."""
        self._check_pool(pool)
        tokens = self.norm(tokens)
        if pool == "avg":
            return tokens[:, self.num_prefix_tokens:].mean(dim=1)
        return tokens[:, 0]


class ViTDecoder(_CheckpointedBlocks, nn.Module):
    def __init__(self, img_size: int, patch_size: int, out_chans: int = 3, width: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, cond: str = "adaln",
                 attn_backend: str = "auto", fused_adaln: bool = False, kernels: str = "auto",
                 num_classes: int = 0, latent_out: int = 0, layout: str = "mae", cond_dim: int = 0) -> None:
        super().__init__()
        _check_layout(layout)
        self.latent_out = latent_out
        """> 0: the decoder returns (B, N, latent_out) latent tokens, not an image."""
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        self.img_size, self.patch_size, self.out_chans, self.cond = img_size, patch_size, out_chans, cond
        self.layout = layout
        self.cond_dim = cond_dim or width
        mae = layout == "mae"
        self.num_prefix_tokens = 1 if mae else 0
        g = img_size // patch_size
        self.num_patches = g * g
        # 'dit': the blocks continue the encoder's sequence, conditioned on the encoder's c, so
        # the decoder has no embedding, position code or sigma embedder of its own.
        self.embed = nn.Linear(width, width) if mae else None
        if mae:
            self.register_buffer("pos_embed", sincos_2d(width, g, g, cls_token=True).unsqueeze(0),
                                 persistent=False)
        else:
            self.pos_embed = None
        own_cond = mae and cond == "adaln"
        self.sigma_embed = SigmaEmbedder(self.cond_dim, SIGMA_FREQ_DIM) if own_cond else None
        self.label_embed = LabelEmbedder(num_classes, self.cond_dim) if num_classes and mae else None
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, cond, attn_backend, fused_adaln, kernels, self.cond_dim)
            for _ in range(depth))
        self.final_layer = FinalLayer(width, latent_out or patch_size * patch_size * out_chans, cond,
                                      fused_adaln, kernels, self.cond_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        _init_common(self)
        # DiT zero-initialises the output projection too: the untrained model predicts zeros.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _conditioning(self, tokens: torch.Tensor, sigma, labels, c: torch.Tensor | None):
        if self.layout == "dit":
            if c is None and self.cond == "adaln":
                raise ValueError("the 'dit' decoder reads the encoder's conditioning vector: pass c "
                                 "(ViTEncoder.encode returns it)")
            return c
        if c is not None:
            raise ValueError("the 'mae' decoder embeds sigma itself: pass sigma (and labels), not c")
        B = tokens.shape[0]
        return None if self.sigma_embed is None else _add_label(
            self.sigma_embed(_sigma_vector(sigma, B, tokens)), self.label_embed, labels, B, tokens)

    def forward_patches(self, tokens: torch.Tensor, sigma=None, labels=None,
                        c: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder tokens (B, num_prefix_tokens + N, width) -> per-patch pixels (B, N, p*p*C).
        Layout 'mae' takes sigma (and labels); 'dit' takes the encoder's conditioning vector c."""
        c = self._conditioning(tokens, sigma, labels, c)
        x = tokens if self.embed is None else self.embed(tokens) + self.pos_embed.to(tokens.dtype)
        x = _run_blocks(self.blocks, x, c)
        return self.final_layer(x[:, self.num_prefix_tokens:], c)

    def forward(self, tokens: torch.Tensor, sigma=None, labels=None,
                c: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder tokens -> image (B, C, H, W), or latent tokens (B, N, d)."""
        patches = self.forward_patches(tokens, sigma, labels, c)
        if self.latent_out:
            return patches
        return unpatchify(patches, self.patch_size, self.img_size, self.img_size, self.out_chans)


class EncoderDecoder(nn.Module):
    """A network of an `encoder` and a `decoder` that checkpoint their blocks together; it reads
    images of the encoder's size and patch."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.patch_size = encoder.patch_size
        self.img_size = encoder.img_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.set_grad_checkpointing(enable)

    @property
    def grad_checkpointing(self) -> bool:
        return self.encoder.grad_checkpointing


__all__ = ["EncoderDecoder", "LAYOUTS", "SIGMA_FREQ_DIM", "ViTDecoder", "ViTEncoder"]
