"""Transformer building blocks: DiT-style adaLN-Zero blocks and plain pre-norm ViT blocks.

Submodule names follow timm's VisionTransformer (norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2) so an encoder made of these blocks exports to timm by renaming nothing; the adaLN
modulation is an extra ``adaLN_modulation`` submodule that the export folds away.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..kernels.attention import attention, resolve_backend
from ..kernels.modules import AdaLNLayerNorm

LN_EPS = 1e-6  # timm's ViT and DiT both use 1e-6; matching it keeps the timm export exact.


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = resolve_backend(backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # (B, N, 3, H, hd) -> three (B, H, N, hd) views; SDPA and xformers take strided inputs.
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp_hidden(dim: int, mlp_ratio: float) -> int:
    # int() truncation, as timm does, so the hidden width matches an exported timm model.
    return int(dim * mlp_ratio)


class Block(nn.Module):
    """Pre-norm transformer block, conditioned by adaLN-Zero when ``cond == 'adaln'``.

    adaLN: shift/scale/gate for the attention and MLP branches come from a linear map of the
    conditioning vector c; the map is zero-initialised so every block starts as the identity.
    The LayerNorms then carry no affine parameters (the modulation replaces them).
    With ``cond == 'none'`` it is a plain ViT block with affine LayerNorms and c is ignored.
    ``cond_dim`` is the width of c (0: dim, DiT's; l-DAE's paper layout uses dim/4).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, cond: str = "adaln",
                 backend: str = "auto", fused_adaln: bool = False, kernels: str = "auto",
                 cond_dim: int = 0) -> None:
        super().__init__()
        if cond not in ("adaln", "none"):
            raise ValueError(f"cond={cond!r}; choose 'adaln' or 'none'")
        self.cond = cond
        affine = cond == "none"
        # With adaLN the norms carry no parameters: kept for timm's names and the plain-ViT path;
        # the modulated norm runs through the kernels' face, which picks the fused kernel or not.
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=affine)
        self.attn = Attention(dim, num_heads, backend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=affine)
        self.mlp = Mlp(dim, mlp_hidden(dim, mlp_ratio))
        if cond == "adaln":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))
            self.norm_modulate = AdaLNLayerNorm(LN_EPS, fused_adaln, kernels)
        # Activation checkpointing lives inside the block, so a compiled block (compile_blocks)
        # traces the checkpoint as part of its graph and the partitioner recomputes inside it.
        # Checkpointing a compiled block from outside fails on torch < 2.5 (the recomputation
        # re-enters Dynamo) and hides the recompute from the compiler on newer ones.
        self.grad_checkpointing = False

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (B, dim)."""
        return self.adaLN_modulation(c).chunk(6, dim=-1)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, c, use_reentrant=False)
        return self._forward(x, c)

    def _forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.cond == "none":
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(c)
        x = x + g1.unsqueeze(1) * self.attn(self.norm_modulate(x, sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(self.norm_modulate(x, sh2, sc2))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> width, as a strided conv (timm name: patch_embed.proj)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H != self.img_size or W != self.img_size:
            raise ValueError(f"input is {H}x{W}; this model was built for {self.img_size}x{self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class TokenEmbed(nn.Module):
    """Latent tokens (B, N, d) -> width, a linear map per token: the embedding of a network that
    is fed the tokenizer's latent instead of the image (ldae.input='latent')."""

    def __init__(self, img_size: int, patch_size: int, in_dim: int, dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 3 or z.shape[1] != self.num_patches or z.shape[2] != self.proj.in_features:
            raise ValueError(f"latent input is {tuple(z.shape)}; this model takes (B, {self.num_patches}, "
                             f"{self.proj.in_features}) tokens")
        return self.proj(z)


class SigmaEmbedder(nn.Module):
    """Noise level sigma (B,) -> (B, dim): sinusoidal features of ``scale * sigma`` then an MLP.

    sigma lives in [0, sqrt(2)] in the final recipe; scaling by 1000 spreads that over the range
    the 10000-period frequencies resolve (the same range as DiT's integer timesteps), so nearby
    small sigmas get distinguishable embeddings.
    """

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1000.0,
                 max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def frequencies(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            torch.arange(half, dtype=torch.float32, device=sigma.device) * (-math.log(self.max_period) / half))
        args = (self.scale * sigma.float()).unsqueeze(1) * freqs.unsqueeze(0)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        if self.freq_dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        emb = self.frequencies(sigma)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    """Tokens -> p*p*C pixels per patch: norm (adaLN-modulated when cond='adaln', from a
    conditioning vector of width cond_dim, 0: dim) + linear."""

    def __init__(self, dim: int, out_dim: int, cond: str = "adaln", fused_adaln: bool = False,
                 kernels: str = "auto", cond_dim: int = 0) -> None:
        super().__init__()
        self.cond = cond
        self.norm = nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=cond == "none")
        self.linear = nn.Linear(dim, out_dim)
        if cond == "adaln":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 2 * dim))
            self.norm_modulate = AdaLNLayerNorm(LN_EPS, fused_adaln, kernels)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond == "adaln":
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
            return self.linear(self.norm_modulate(x, shift, scale))
        return self.linear(self.norm(x))
