"""Patch-wise linear VAE (l-DAE Table 2, "patch-wise VAE"): the patch-wise AE's linear E (d, D)
and G (D, d) fitted with a KL term towards N(0, I) (weight tokenizer.beta) and a learned
log-variance per latent dim.

encode() is the posterior mean (patch - mean) E^T, so the tokenizer stays affine and
`linear_maps()` hands (E, G) to the fused noise kernel; the log-variance is kept for the record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from . import _io
from .patch_ae import PatchAETokenizer, fit_kwargs, fit_linear


@dataclass
class PatchVAETokenizer(PatchAETokenizer):
    logvar: torch.Tensor | None = None
    """(d,) posterior log-variance per latent dim."""
    kind: str = "patch-vae"

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**super()._tensors(), "logvar": self.logvar}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> PatchVAETokenizer:
        p, d = cls._check_shapes(tensors, {"kind": "patch-vae", **meta}, logvar=True)
        return cls(tensors["encoder"].float(), tensors["decoder"].float(), tensors["mean"].float(), p, d,
                   meta.get("kind", "patch-vae"), int(meta.get("channels", 3)),
                   int(meta.get("num_patches_fitted", 0)), dict(meta.get("fit", {})), tensors["logvar"].float())


def fit_patch_vae(images: Iterable[torch.Tensor], patch_size: int, latent_dim: int, *, beta: float,
                  max_images: int, max_patches: int, steps: int, lr: float, batch: int, seed: int,
                  log: Callable[[str], None] | None = None) -> PatchVAETokenizer:
    patches, channels = _io.collect_patches(images, patch_size, max_images, max_patches, seed)
    mean = patches.double().mean(0).float()
    r = fit_linear(patches - mean, latent_dim, steps, lr, batch, seed, beta=beta, log=log)
    stats = _io.finite_stats(recon_mse=r["recon_mse"], kl=r["kl"])
    return PatchVAETokenizer(r["encoder"], r["decoder"], mean, patch_size, latent_dim, "patch-vae", channels,
                             patches.shape[0], {**stats, "beta": beta, "steps": steps, "lr": lr, "batch": batch},
                             r["logvar"])


def prepare(cfg, images: Callable[[], Iterable[torch.Tensor]], log: Callable[[str], None]) -> PatchVAETokenizer:
    t0 = time.time()
    tok = fit_patch_vae(images(), cfg.model.patch_size, cfg.tokenizer.latent_dim, beta=cfg.tokenizer.beta,
                        log=log, **fit_kwargs(cfg))
    log(f"fitted the patch-wise VAE (beta {cfg.tokenizer.beta:g}) on {tok.num_patches_fitted} patches "
        f"(D={tok.D}, d={tok.d}) in {time.time() - t0:.1f}s; reconstruction MSE {tok.fit['recon_mse']:.4g} "
        f"per pixel, KL {tok.fit['kl']:.4g} per patch")
    return tok
