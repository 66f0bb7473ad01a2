"""What the linear probe and kNN read of an encoder: the shared wrapper each method's probe view
builds (a fixed conditioning, a cut after k blocks, the input as the method noises it)."""

from __future__ import annotations

from typing import Callable, Optional

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
        """Clean images -> latent tokens, for an encoder fed latent tokens (model.input='latent')."""
        self.num_features = feature_dim(encoder)
        self._calls = 0

    def pooled(self, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        B = x.shape[0]
        if self.noisy_input is not None:
            g = torch.full((B,), self.gamma, device=x.device)
            s = torch.full((B,), self.sigma, device=x.device)
            x = self.noisy_input(x.float(), g, s, self._calls).to(x.dtype)
            self._calls += 1
        elif self.tokens is not None:
            x = self.tokens(x.float()).to(x.dtype)
        if not hasattr(self.encoder, "pooled"):
            return pool_features(self.encoder, x, pool)
        kw = {}
        if self.sigma:
            kw["sigma"] = self.sigma
        if self.depth:
            kw["depth"] = self.depth
        return self.encoder.pooled(x, pool=pool, **kw)


def unconditioned_view(encoder: nn.Module, cfg, method=None) -> nn.Module:
    """The probe view of an encoder with no noise conditioning (DiffMAE's, MAE's): the clean,
    unmasked image through all blocks, or the first eval.probe_depth of them."""
    if cfg.eval.probe_input != "noisy" and not cfg.eval.probe_depth:
        return encoder
    if cfg.eval.probe_input == "noisy":
        raise ValueError(f"eval.probe_input='noisy': objective.method={cfg.objective.method!r} "
                         "probes the clean image (its encoder takes no noise level)")
    return ProbeView(encoder, 0.0, cfg.eval.probe_depth)

