"""What the linear probe and kNN read of an encoder: the shared wrapper each method's probe view
builds (a fixed conditioning, a cut after k blocks, the input as the method noises it)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

POOLS = ("avg", "cls")


def pool_features(encoder: nn.Module, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """(B, C, H, W) images -> (B, F) features. The encoder's own `pooled` decides where its final
    norm sits and which tokens it averages (the l-DAE 'dit' layout has no class token: all of
    them); modules without one get the MAE convention (mean over the tokens after
    `num_prefix_tokens`, default 1, the class token)."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}; choose one of {', '.join(POOLS)}")
    if hasattr(encoder, "pooled"):
        return encoder.pooled(x, pool=pool)
    tokens = encoder.forward_features(x)
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    if pool == "cls" and prefix == 0:
        raise ValueError("pool='cls' needs a class token; this encoder has none (use pool='avg')")
    return tokens[:, 0] if pool == "cls" else tokens[:, prefix:].mean(1)


def pooled_at_depths(encoder: nn.Module, x: torch.Tensor, depths: Sequence[int], pool: str = "avg",
                     sigma=None, more_blocks: Sequence[nn.Module] = ()) -> list[torch.Tensor]:
    """Pooled features after each of `depths` blocks from one forward: the encoder's blocks then
    `more_blocks` (a 'dit' decoder's first blocks continue the same tokens), read through the
    encoder's own `pool_tokens` at every depth asked. Each depth's features are the ones a forward
    cut at that depth gives (the same operations on the same tensors)."""
    want = [int(k) for k in depths]
    blocks = [*encoder.blocks, *more_blocks]
    if not want or min(want) < 1 or max(want) > len(blocks):
        raise ValueError(f"depths {want}: this network has blocks 1..{len(blocks)} to read")
    tokens, c = encoder.embed(x, sigma)
    taps: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(blocks[:max(want)], start=1):
        tokens = blk(tokens, c)
        if i in want:
            taps[i] = encoder.pool_tokens(tokens, pool)
    return [taps[k] for k in want]


def feature_dim(encoder: nn.Module) -> int:
    return int(getattr(encoder, "num_features", 0) or getattr(encoder, "embed_dim", 0))


class ProbeView(nn.Module):
    """An encoder as the probe sees it: conditioned on a fixed sigma, cut after `depth` blocks
    (0: all), fed either the clean image or the image noised at that level by `noisy_input`
    (the method's training noise, a fixed draw per batch position)."""

    def __init__(self, encoder: nn.Module, sigma: float = 0.0, depth: int = 0,
                 noisy_input: Optional[Callable] = None, gamma: float = 1.0,
                 tokens: Optional[Callable] = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.sigma, self.depth, self.gamma = float(sigma), int(depth), float(gamma)
        self.noisy_input = noisy_input
        self.tokens = tokens
        """Clean images -> latent tokens, for an encoder fed latent tokens (ldae.input='latent')."""
        self.num_features = feature_dim(encoder)
        self._calls = 0

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """The image as the encoder takes it: noised at this view's level (the next fixed draw),
        or as latent tokens, or unchanged."""
        B = x.shape[0]
        if self.noisy_input is not None:
            g = torch.full((B,), self.gamma, device=x.device)
            s = torch.full((B,), self.sigma, device=x.device)
            x = self.noisy_input(x.float(), g, s, self._calls).to(x.dtype)
            self._calls += 1
        elif self.tokens is not None:
            x = self.tokens(x.float()).to(x.dtype)
        return x

    def pooled_depths(self, x: torch.Tensor, depths: Sequence[int], pool: str = "avg") -> list[torch.Tensor]:
        """Features after each of `depths` blocks (0: all the encoder's), at this view's sigma and
        input, from one forward when the encoder exposes its blocks (`embed`, `pool_tokens`, or its
        own `pooled_depths`); else one forward per depth."""
        x = self._input(x)
        n = len(getattr(self.encoder, "blocks", ()))
        ks = [int(k) or n for k in depths]
        sigma = self.sigma or None
        if hasattr(self.encoder, "pooled_depths"):
            return self.encoder.pooled_depths(x, ks, pool=pool, sigma=sigma)
        if hasattr(self.encoder, "embed") and hasattr(self.encoder, "pool_tokens"):
            return pooled_at_depths(self.encoder, x, ks, pool, sigma)
        return [self.encoder.pooled(x, pool=pool, **({"sigma": sigma} if sigma else {}), depth=k) for k in ks]

    def pooled(self, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        x = self._input(x)
        if not hasattr(self.encoder, "pooled"):
            return pool_features(self.encoder, x, pool)
        kw = {}
        if self.sigma:
            kw["sigma"] = self.sigma
        if self.depth:
            kw["depth"] = self.depth
        return self.encoder.pooled(x, pool=pool, **kw)


def encoder_probe(model: nn.Module, cfg) -> nn.Module:
    """MethodSpec.probe_encoder's default: the network's encoder, whose blocks are all a probe
    may read; a deeper eval.probe_depth is an error, never a silent 'all blocks'."""
    enc = model.encoder
    k, n = int(cfg.eval.probe_depth), len(enc.blocks)
    if k > n:
        raise ValueError(f"eval.probe_depth={k}: this network has {n} encoder blocks to probe (0: all)")
    return enc


def unconditioned_view(encoder: nn.Module, cfg, method=None) -> nn.Module:
    """The probe view of an encoder with no noise conditioning (DiffMAE's, MAE's): the clean,
    unmasked image through all blocks, or the first eval.probe_depth of them."""
    if cfg.eval.probe_input != "noisy" and not cfg.eval.probe_depth:
        return encoder
    if cfg.eval.probe_input == "noisy":
        raise ValueError(f"eval.probe_input='noisy': objective.method={cfg.objective.method!r} "
                         "probes the clean image (its encoder takes no noise level)")
    return ProbeView(encoder, 0.0, cfg.eval.probe_depth)

