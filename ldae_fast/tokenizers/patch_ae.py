"""Patch-wise linear autoencoder (l-DAE Table 2, "patch-wise AE"): latent = (patch - mean) E^T,
patch = latent G^T + mean, with E (d, D) and G (D, d) fitted by gradient descent on the
reconstruction error of patches, with no constraint tying them (PCA is the case E = V_d, G = V_d^T).

Affine, so `linear_maps()` hands (E, G) to the fused noise kernel. The fit is deterministic given
engine.seed: the init, the patch subsample and the minibatch order are keyed on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import reference
from . import _io

FORMAT_VERSION = 1


@dataclass
class PatchAETokenizer:
    encoder: torch.Tensor
    """E, (d, D) float32."""
    decoder: torch.Tensor
    """G, (D, d) float32."""
    mean: torch.Tensor
    """(D,) float32 mean patch of the fit data (the affine offset)."""
    patch_size: int
    d: int
    kind: str = "patch-ae"
    channels: int = 3
    num_patches_fitted: int = 0
    fit: dict = field(default_factory=dict)
    """What the fit reported (plain floats / ints): recon_mse per pixel, steps, lr, ..."""

    @property
    def D(self) -> int:
        return self.encoder.shape[1]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"encoder": self.encoder, "decoder": self.decoder, "mean": self.mean}

    def to(self, device):
        t = {k: v.to(device) for k, v in self._tensors().items()}
        return type(self).from_state(t, self.metadata())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (reference.patchify(images.float(), self.patch_size) - self.mean) @ self.encoder.t()

    def decode(self, z: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return reference.unpatchify(z.float() @ self.decoder.t() + self.mean, self.patch_size, H, W, self.channels)

    def linear_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E (d, D), G (D, d)): latent = (patch - mean) E^T, patch = latent G^T + mean."""
        return self.encoder, self.decoder

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.float().cpu().contiguous() for k, v in self._tensors().items()}

    def metadata(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": self.kind, "patch_size": self.patch_size,
                "channels": self.channels, "latent_dim": self.d, "patch_dim": self.D,
                "num_patches_fitted": self.num_patches_fitted, "fit": dict(self.fit)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.__dict__.update(type(self).from_state(tensors, meta).__dict__)

    def save(self, path: str | Path) -> Path:
        return _io.save_tokenizer_file(path, self.state_dict(), self.metadata())

    @classmethod
    def _check_shapes(cls, tensors: dict, meta: dict, logvar: bool = False) -> tuple[int, int]:
        """(patch size, d) after checking every tensor's shape against the metadata and its values
        for finiteness (TokenizerFileError otherwise); `logvar`: the VAE's (d,) log-variance too."""
        p, d, C = int(meta["patch_size"]), int(meta["latent_dim"]), int(meta.get("channels", 3))
        D = C * p * p
        want = {"encoder": (d, D), "decoder": (D, d), "mean": (D,), **({"logvar": (d,)} if logvar else {})}
        _io.check_tensors(str(meta.get("kind", "patch-ae")), tensors, want,
                          why=f"patch {p}, d={d}, {C} channels in its metadata")
        return p, d

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> PatchAETokenizer:
        p, d = cls._check_shapes(tensors, meta)
        return cls(tensors["encoder"].float(), tensors["decoder"].float(), tensors["mean"].float(), p, d,
                   meta.get("kind", "patch-ae"), int(meta.get("channels", 3)),
                   int(meta.get("num_patches_fitted", 0)), dict(meta.get("fit", {})))


def fit_linear(patches: torch.Tensor, d: int, steps: int, lr: float, batch: int, seed: int,
               beta: float | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Fit E (d, D), G (D, d) on centred patches (n, D) with Adam, minibatches of `batch`.

    beta None: the AE, loss = mean over patches of |x - G E x|^2. beta >= 0: the linear VAE, with
    q(z|x) = N(E x, diag(exp(logvar))) (a log-variance per latent dim: for a linear Gaussian
    model the optimal posterior variance does not depend on x), one reparameterised draw per
    patch, loss = |x - G z|^2 + beta KL(q || N(0, I)) (a Gaussian decoder of variance beta / 2).
    -> {"encoder", "decoder", "logvar" (VAE only), "recon_mse", "kl" (VAE only)}.
    """
    from ..seeding import derive_seed

    n, D = patches.shape
    if not 1 <= d <= D:
        raise ValueError(f"latent_dim={d} must be in 1..{D}")
    g = torch.Generator().manual_seed(derive_seed(seed, _io.TAG_TOKENIZER_FIT, 2))
    # Start from a random orthonormal map (a random-subspace projection): the latent starts at the
    # data's scale, so the noise the method adds later means the same thing across fits.
    q, _ = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))
    E = torch.nn.Parameter(q.t().float().contiguous())
    G = torch.nn.Parameter(q.float().contiguous())
    params = [E, G]
    vae = beta is not None
    if vae:
        logvar = torch.nn.Parameter(torch.full((d,), -4.0))
        params.append(logvar)
    opt = torch.optim.Adam(params, lr=lr)
    batch = min(batch, n)
    t0, last = time.time(), time.time()
    for step in range(steps):
        _io.set_fit_lr(opt, lr, step, steps)
        idx = torch.randint(0, n, (batch,), generator=g)
        x = patches[idx]
        m = x @ E.t()
        if vae:
            z = m + torch.exp(0.5 * logvar) * torch.randn(m.shape, generator=g)
            kl = 0.5 * (m.square() + logvar.exp() - logvar - 1).sum(-1).mean()
        else:
            z, kl = m, None
        rec = (z @ G.t() - x).square().sum(-1).mean()
        loss = rec + beta * kl if vae else rec
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (time.time() - last > 10 or step == steps - 1):
            last = time.time()
            log(f"tokenizer fit: step {step + 1}/{steps}, recon {rec.item() / D:.4g} per pixel"
                + (f", KL {kl.item():.4g} per patch" if vae else "") + f", {last - t0:.0f}s")
    with torch.no_grad():
        m = patches @ E.t()
        out = {"encoder": E.detach().clone(), "decoder": G.detach().clone(),
               "recon_mse": float((m @ G.t() - patches).square().mean())}
        if vae:
            out["logvar"] = logvar.detach().clone()
            out["kl"] = float(0.5 * (m.square() + logvar.exp() - logvar - 1).sum(-1).mean())
    return out


def fit_patch_ae(images: Iterable[torch.Tensor], patch_size: int, latent_dim: int, *, max_images: int,
                 max_patches: int, steps: int, lr: float, batch: int, seed: int,
                 log: Callable[[str], None] | None = None) -> PatchAETokenizer:
    patches, channels = _io.collect_patches(images, patch_size, max_images, max_patches, seed)
    mean = patches.double().mean(0).float()
    r = fit_linear(patches - mean, latent_dim, steps, lr, batch, seed, log=log)
    stats = _io.finite_stats(recon_mse=r["recon_mse"])
    return PatchAETokenizer(r["encoder"], r["decoder"], mean, patch_size, latent_dim, "patch-ae", channels,
                            patches.shape[0], {**stats, "steps": steps, "lr": lr, "batch": batch})


def fit_kwargs(cfg) -> dict:
    t = cfg.tokenizer
    return {"max_images": t.fit_images, "max_patches": t.fit_patches, "steps": t.fit_steps, "lr": t.fit_lr,
            "batch": t.fit_batch, "seed": cfg.engine.seed}


def prepare(cfg, images: Callable[[], Iterable[torch.Tensor]], log: Callable[[str], None]) -> PatchAETokenizer:
    """Fitted on tokenizer.fit_images images of `images()` (a saved one: tokenizer.path, read by
    the registry)."""
    t0 = time.time()
    tok = fit_patch_ae(images(), cfg.model.patch_size, cfg.tokenizer.latent_dim, log=log, **fit_kwargs(cfg))
    log(f"fitted the patch-wise AE on {tok.num_patches_fitted} patches (D={tok.D}, d={tok.d}) in "
        f"{time.time() - t0:.1f}s; reconstruction MSE {tok.fit['recon_mse']:.4g} per pixel")
    return tok
