"""l-DAE as a method: clean images in, a scalar loss out; the same noising for figures.

Final recipe (DESIGN.md): t ~ U(0, 1) per sample, gamma_t = 1, sigma_t = sqrt(2) t; noise added to
the first d latent components of each patch (the PCA tokenizer); the network sees
the decoded noisy image and predicts the clean image; loss weighted 1 / (1 + sigma^2) per sample
and w_i = 1 / 0.1 across PCA components.

Every tokenizer trains (l-DAE Tables 1-2):
- linear (`linear_maps()` gives encoder E (d, D), decoder G (D, d)): the fused noise kernel,
  z0 = (patch - mean) E^T, x_in = z_t G^T + mean; PCA and pixels (G = E^T) take its one-basis call.
  The x0 loss's weights w (low on the first d components, high on the rest) are defined in the
  orthonormal PCA basis only: with another linear map, x0 is refused unless low = high, where the
  loss is high |x - x_hat|^2 per patch, the same in any basis.
- non-linear (the conv VAE, `linear_maps()` None): the reference path, z0 = tokenizer.encode(x)
  (the posterior mean, no gradient), eps from `reference_eps` on the kernel's counter layout,
  z_t = gamma z0 + sigma eps, fed as tokens or decoded by tokenizer.decode. The network must
  output latent tokens: an image output would need a gradient through the non-linear encoder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...batch import Batch
from ...config import Config, ConfigError
from ...kernels import latent_noise, pca_loss
from ...kernels.noise import reference_eps
from ...markers import nvtx_range
from ...reference import patchify, unpatchify
from ...seeding import TAG_LABEL_DROP, TAG_NOISE, TAG_NOISE_LEVEL, derive_seed, global_rows
from ...tokenizers import Tokenizer, prepare_tokenizer, tokenizer_from_state
from .. import sampling
from ..base import place
from . import schedules

# What each learned tokenizer kind is, for the checks that can run before it is fitted.
_LEARNED_KINDS = {
    "conv-vae": {"linear": False, "orthonormal": False},
    "patch-ae": {"linear": True, "orthonormal": False},
    "patch-vae": {"linear": True, "orthonormal": False},
}


@dataclass
class NoisyBatch:
    x_in: torch.Tensor
    """Network input, (B, C, H, W)."""
    sigma: torch.Tensor
    """Per-sample noise level (the conditioning), (B,)."""
    gamma: torch.Tensor
    lam: torch.Tensor
    """Per-sample loss weight, (B,)."""
    target: torch.Tensor | None = None
    """The latent target (B, N, d) of noise.target 'z0' / 'eps'; None for 'x0' (the image)."""


class LDAEMethod:
    """Owns the tokenizer, the noise (schedule, keyed draws, input scaling), the loss and the
    sampler; the kernel choice is resolved once, for its device."""

    name = "ldae"

    def __init__(self, cfg: Config, device: torch.device | str, rank: int = 0, world_size: int = 1,
                 tokenizer: Tokenizer | None = None, kernels: str | None = None):
        place(self, cfg, device, rank, world_size, kernels)
        self.noise_cfg = cfg.noise
        self.tok: Tokenizer | None = None
        self.basis: torch.Tensor | None = None
        """The encoder E (d, D) of a linear tokenizer (PCA: V_d); None for a non-linear one."""
        self.decoder: torch.Tensor | None = None
        """The decoder G (D, d) when it is not basis^T (a patch-wise AE / VAE); else None."""
        self.mean: torch.Tensor | None = None
        # A learned tokenizer's kind says before its (slow) fit what it will be: the conv VAE is
        # non-linear, a fitted patch AE / VAE is a linear map that is never orthonormal.
        if tokenizer is None and not cfg.tokenizer.path and cfg.tokenizer.kind in _LEARNED_KINDS:
            self._check_tokenizer(cfg.tokenizer.kind, **_LEARNED_KINDS[cfg.tokenizer.kind])
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    # setup ----------------------------------------------------------------------------------
    def _check_tokenizer(self, kind: str, linear: bool, orthonormal: bool) -> None:
        net, n = self.cfg.ldae, self.noise_cfg
        if not linear and net.output != "latent":
            raise ConfigError(
                f"tokenizer.kind={kind!r} is not linear: l-DAE needs ldae.output='latent' with noise.target "
                f"'z0' or 'eps' (got ldae.output={net.output!r}, noise.target={n.target!r}); an image output's "
                "loss would need a gradient through its non-linear encoder")
        if linear and not orthonormal and n.target == "x0" and n.low_weight != n.high_weight:
            raise ConfigError(
                f"noise.target='x0' with noise.low_weight={n.low_weight:g} != noise.high_weight={n.high_weight:g} "
                f"weighs the residual's PCA components, which tokenizer.kind={kind!r} (a linear map that is not "
                "an orthonormal basis used both ways) does not define; use tokenizer.kind=pca, equal weights "
                "(a plain pixel loss), or noise.target='z0' / 'eps'")

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        maps = tokenizer.linear_maps()
        orthonormal = False
        if maps is not None:
            enc, dec = maps
            eye = torch.eye(enc.shape[0], dtype=enc.dtype, device=enc.device)
            orthonormal = bool(torch.allclose(dec, enc.T, atol=1e-5) and torch.allclose(enc @ enc.T, eye, atol=1e-4))
        self._check_tokenizer(tokenizer.kind, maps is not None, orthonormal)
        self.tok = tokenizer.to(self.device)
        maps = self.tok.linear_maps()
        if maps is None:
            self.basis = self.decoder = self.mean = None
            return
        enc, dec = maps
        # The loss needs only V_d: the identity in DESIGN.md avoids the (D, D) product per token.
        self.basis = enc.contiguous()
        # Exactly E^T (PCA, pixels) keeps the one-basis kernel call, bit for bit as it always was.
        self.decoder = None if torch.equal(dec, enc.t()) else dec.contiguous()
        self.mean = self.tok.mean.contiguous()

    def to(self, device: torch.device | str) -> LDAEMethod:
        return LDAEMethod(self.cfg, device, self.rank, self.world_size, self.tok, self._mode)

    @property
    def tokenizer(self) -> Tokenizer:
        if self.tok is None:
            raise RuntimeError("the method has no tokenizer yet: call prepare() first")
        return self.tok

    def prepare(self, images: Callable[[], Iterable[torch.Tensor]], *, rank: int = 0,
                broadcast: Callable[[Any], Any] | None = None, log: Callable[[str], None] = print,
                state: dict | None = None) -> None:
        if state is not None:
            self.load_state_dict(state)
            return
        tok = prepare_tokenizer(self.cfg, images, log) if (broadcast is None or rank == 0) else None
        if broadcast is not None:
            payload = broadcast((tok.state_dict(), tok.metadata()) if rank == 0 else None)
            if rank != 0:
                tok = tokenizer_from_state(*payload)
        self.set_tokenizer(tok)

    def state_dict(self) -> dict:
        return {"tokenizer": {"tensors": self.tokenizer.state_dict(), "meta": self.tokenizer.metadata()}}

    def load_state_dict(self, state: dict) -> None:
        tk = state["tokenizer"]
        self.set_tokenizer(tokenizer_from_state(tk["tensors"], tk["meta"]))

    def export(self, out_dir: Path) -> None:
        self.tokenizer.save(Path(out_dir) / "tokenizer.safetensors")

    # noise ----------------------------------------------------------------------------------
    def noise_levels(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.noise_cfg
        gamma, sigma = schedules.gamma_sigma(t, n.schedule, n.sigma_max, n.num_timesteps, n.single_sigma)
        return gamma, sigma, schedules.loss_weight(n.loss_weight, gamma, sigma)

    def noisy_input(self, x: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor, step: int,
                    row: int = 0, target: str = "x0"):
        """The network input for clean x at levels (gamma, sigma): noise in the latent, decoded
        (or the noisy latent tokens z_t (B, N, d) themselves with ldae.input='latent'), scaled by
        noise.input_scaling. eps of sample b is keyed on (engine.seed, step, row + b).
        With target 'z0' or 'eps', returns (x_in, that latent (B, N, d)) from the same pass."""
        B = x.shape[0]
        N = (x.shape[2] // self.p) * (x.shape[3] // self.p)
        seed = derive_seed(self.cfg.engine.seed, TAG_NOISE, step)
        latent_in = self.cfg.ldae.input == "latent"
        want_z0, want_eps = latent_in or target == "z0", latent_in or target == "eps"
        d = self.tokenizer.d
        shape = (B, 1, 1) if latent_in else (B, 1, 1, 1)
        with torch.no_grad():
            if self.basis is None:
                # Non-linear: eps from the reference stream on the kernel's counter layout (sample
                # b keyed on the counter of its first element), so ranks and micro-batches draw
                # what one process draws and a resume redraws the same noise.
                z0 = self.tok.encode(x.float()).float()
                eps = reference_eps(seed, row * N * d, B, N, d, x.device)
                zt = gamma.float().view(B, 1, 1) * z0 + sigma.float().view(B, 1, 1) * eps
                x_in = zt if latent_in else self.tok.decode(zt, x.shape[2], x.shape[3]).to(x.dtype)
            else:
                # The kernel's counter for element (b, n, i) is offset + (b*N + n)*d + i.
                out = latent_noise(x, self.basis, self.mean, gamma.float(), sigma.float(), self.p,
                                   seed=seed, offset=row * N * d, return_z0=want_z0,
                                   return_eps=want_eps, decoder=self.decoder, kernels=self.kernels)
                parts = list(out) if (want_z0 or want_eps) else [out]
                x_in = parts.pop(0)
                z0 = parts.pop(0) if want_z0 else None
                eps = parts.pop(0) if want_eps else None
                if latent_in:
                    x_in = gamma.float().view(shape) * z0 + sigma.float().view(shape) * eps
            if self.noise_cfg.input_scaling:
                x_in = x_in / (gamma.square() + sigma.square()).sqrt().view(shape).to(x_in.dtype)
        if target == "x0":
            return x_in
        return x_in, (z0 if target == "z0" else eps)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Clean images (B, C, H, W) -> their latent tokens z0 (B, N, d), through the encoder E
        (differentiable) or a non-linear tokenizer's encode (no gradient)."""
        if self.basis is None:
            return self.tokenizer.encode(x.float()).float()
        return (patchify(x.float(), self.p) - self.mean) @ self.basis.t()

    def to_image(self, t: torch.Tensor) -> torch.Tensor:
        """Latent tokens (B, N, d) back to an image through the tokenizer's decoder G (or its
        decode); an image passes through."""
        if t.dim() != 3:
            return t
        s = self.cfg.data.img_size
        if self.basis is None:
            return self.tokenizer.decode(t.float(), s, s).float()
        back = self.basis if self.decoder is None else self.decoder.t()
        return unpatchify(t.float() @ back + self.mean, self.p, s, s)

    def add_noise(self, x: torch.Tensor, step: int, t: torch.Tensor | None = None, micro: int = 0,
                  accum: int = 1) -> NoisyBatch:
        """Sample t per image (unless given) and noise x in the latent; no gradient flows to x.

        Draws are keyed on the optimizer step and on the sample's place in the step's global batch
        (`seeding.global_rows`), so a sharded or accumulated run draws what a single-device one does.
        """
        B = x.shape[0]
        lo, Bg = global_rows(B, micro, accum, self.rank, self.world_size)
        if t is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(derive_seed(self.cfg.engine.seed, TAG_NOISE_LEVEL, step))
            t = torch.rand(Bg, generator=gen, device=self.device)[lo:lo + B]
        gamma, sigma, lam = self.noise_levels(t.float())
        target = self.noise_cfg.target
        if target == "x0":
            return NoisyBatch(self.noisy_input(x, gamma, sigma, step, lo), sigma, gamma, lam)
        x_in, lat = self.noisy_input(x, gamma, sigma, step, lo, target)
        return NoisyBatch(x_in, sigma, gamma, lam, lat)

    def condition(self, sigma: torch.Tensor, batch: Batch | None = None, step: int = 0, row: int = 0) -> dict:
        """The model's conditioning (DiT's model_kwargs). With ldae.class_cond the labels join it,
        each dropped to the null class with probability ldae.label_dropout (keyed on the step and
        the sample's row of the global batch); no batch (figures) means the null class."""
        cond = {"sigma": sigma}
        m, net = self.cfg.model, self.cfg.ldae
        if net.class_cond:
            labels = None if batch is None else batch.labels
            if labels is not None:
                labels = labels.to(sigma.device).long()
                if net.label_dropout > 0:
                    gen = torch.Generator(device="cpu")
                    gen.manual_seed(derive_seed(self.cfg.engine.seed, TAG_LABEL_DROP, step))
                    B = labels.shape[0]
                    u = torch.rand(row + B, generator=gen)[row:].to(sigma.device)
                    labels = torch.where(u < net.label_dropout, torch.full_like(labels, m.num_classes), labels)
            cond["labels"] = labels
        return cond

    # loss -----------------------------------------------------------------------------------
    def loss(self, pred: torch.Tensor, target: torch.Tensor, lam: torch.Tensor,
             latent_target: torch.Tensor | None = None) -> torch.Tensor:
        n = self.noise_cfg
        if latent_target is None:
            return pca_loss(pred, target, self.basis, lam, self.p, n.low_weight, n.high_weight, kernels=self.kernels)
        # z0 / eps: a latent output as it is, an image through the tokenizer's encoder.
        lat = pred.float() if pred.dim() == 3 else self.tokens(pred)
        per_token = (lat - latent_target).square().sum(-1).mean(-1)
        return (lam.float() * per_token).mean()

    def __call__(self, model: torch.nn.Module, batch: Batch, step: int, micro: int = 0, accum: int = 1,
                 *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        x = batch.images
        with nvtx_range("noise"):
            nb = self.add_noise(x, step, micro=micro, accum=accum)
        B = x.shape[0]
        row, _ = global_rows(B, micro, accum, self.rank, self.world_size)
        cond = self.condition(nb.sigma, batch, step, row)
        if autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=autocast_dtype):
                pred = model(nb.x_in, **cond)
        else:
            pred = model(nb.x_in, **cond)
        with nvtx_range("loss"):
            return self.loss(pred, x, nb.lam, nb.target)

    # sampling -------------------------------------------------------------------------------
    def sample(self, model: torch.nn.Module, images: torch.Tensor, sigmas: Sequence[float], *, step: int = 0
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sigma, (network input, denoised image): the noise of training step `step` (the same
        eps at every sigma), gamma from noise.schedule, input scaling as configured."""
        x = images.to(self.device).float().contiguous()
        gamma_of = functools.partial(schedules.gamma_for_sigma, schedule=self.noise_cfg.schedule)
        pairs = sampling.denoise_at_levels(model, x, sigmas, gamma_of,
                                           lambda x_, g, s: self.noisy_input(x_, g, s, step),
                                           self.condition)
        # Latent inputs / outputs are shown as the images they decode to.
        return [(self.to_image(a), self.to_image(b)) for a, b in pairs]
