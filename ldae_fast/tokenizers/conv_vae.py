"""A small convolutional KL-VAE (l-DAE Table 2, "conv VAE"), trained by the project from scratch.

Stride 8 (three stride-2 convolutions) to a latent map of c channels; a token is the
(p/8) x (p/8) block of latent positions under a p x p patch, so d = c (p/8)^2 (at p = 16, d = 4c:
the paper's "per-token dim calibrated x4"). tokenizer.latent_dim is that d, and c follows from it.

Loss per image: squared error summed over pixels + tokenizer.beta x KL, plus, with
tokenizer.adversarial on, tokenizer.adv_weight x a hinge adversarial term from a patch discriminator trained alongside
from scratch over the fit's second half (the paper's tokenizers use a pretrained VQGAN and a
perceptual loss whose weights are supervised: docs/tokenizers.md). Nonlinear, so
`linear_maps()` is None and a method uses its reference path.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import reference
from . import _io

FORMAT_VERSION = 1
STRIDE = 8


class ConvVAE(nn.Module):
    def __init__(self, latent_channels: int, width: int = 32, channels: int = 3):
        super().__init__()
        w = width
        act = nn.SiLU
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), act(),
            nn.Conv2d(w, w, 4, stride=2, padding=1), act(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), act(),
            nn.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1), act(),
            nn.Conv2d(2 * w, 2 * latent_channels, 3, padding=1),
        )

        def up(cin, cout):
            return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1), act()]

        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, 2 * w, 3, padding=1), act(),
            *up(2 * w, 2 * w), *up(2 * w, w), *up(w, w),
            nn.Conv2d(w, channels, 3, padding=1),
        )

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        # Bounded so an early large step cannot overflow exp() into a non-finite fit.
        return mu, logvar.clamp(-30.0, 20.0)


class PatchDiscriminator(nn.Module):
    """A PatchGAN-style critic: one logit per ~16 px receptive field, no normalisation layers."""

    def __init__(self, width: int = 32, channels: int = 3):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(channels, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def latent_channels_for(latent_dim: int, patch_size: int) -> int:
    """c with d = c (p/8)^2; ValueError naming the fields when there is none."""
    if patch_size % STRIDE:
        raise ValueError(f"tokenizer.kind='conv-vae' downsamples by {STRIDE}: model.patch_size={patch_size} "
                         f"must be a multiple of {STRIDE}")
    per = (patch_size // STRIDE) ** 2
    if latent_dim % per:
        raise ValueError(f"tokenizer.kind='conv-vae' at model.patch_size={patch_size}: a token holds {per} "
                         f"latent positions, so tokenizer.latent_dim={latent_dim} must be a multiple of {per}")
    return latent_dim // per


@dataclass
class ConvVAETokenizer:
    net: ConvVAE
    patch_size: int
    d: int
    width: int = 32
    kind: str = "conv-vae"
    channels: int = 3
    num_images_fitted: int = 0
    fit: dict = field(default_factory=dict)

    @property
    def latent_channels(self) -> int:
        return self.d // (self.patch_size // STRIDE) ** 2

    def to(self, device) -> ConvVAETokenizer:
        # A copy, as the linear tokenizers' to() is: moving one must not move the other's weights.
        return dataclasses.replace(self, net=copy.deepcopy(self.net).to(device))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior mean, grouped into (B, N, d) tokens."""
        with torch.no_grad():
            mu, _ = self.net.moments(images.float())
        return reference.patchify(mu, self.patch_size // STRIDE)

    def decode(self, z: torch.Tensor, H: int, W: int) -> torch.Tensor:
        lat = reference.unpatchify(z.float(), self.patch_size // STRIDE, H // STRIDE, W // STRIDE,
                                   self.latent_channels)
        with torch.no_grad():
            return self.net.decoder(lat)

    def linear_maps(self) -> None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous() for k, v in self.net.state_dict().items()}

    def metadata(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": self.kind, "patch_size": self.patch_size,
                "channels": self.channels, "latent_dim": self.d, "latent_channels": self.latent_channels,
                "stride": STRIDE, "width": self.width, "num_images_fitted": self.num_images_fitted,
                "fit": dict(self.fit)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.__dict__.update(type(self).from_state(tensors, meta).__dict__)

    def save(self, path: str | Path) -> Path:
        return _io.save_tokenizer_file(path, self.state_dict(), self.metadata())

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> ConvVAETokenizer:
        p, d = int(meta["patch_size"]), int(meta["latent_dim"])
        if int(meta.get("stride", STRIDE)) != STRIDE:
            raise ValueError(f"conv-vae tokenizer has stride {meta.get('stride')}; this version reads {STRIDE}")
        width, C = int(meta.get("width", 32)), int(meta.get("channels", 3))
        _io.check_tensors(str(meta.get("kind", "conv-vae")), tensors, {})  # finite; shapes: the strict load
        net = ConvVAE(latent_channels_for(d, p), width, C)
        net.load_state_dict(tensors, strict=True)  # a missing or misshapen tensor is an error here
        net.eval()
        return cls(net, p, d, width, meta.get("kind", "conv-vae"), C, int(meta.get("num_images_fitted", 0)),
                   dict(meta.get("fit", {})))


def _collect_images(images: Iterable[torch.Tensor], max_images: int) -> torch.Tensor:
    kept, seen = [], 0
    for batch in images:
        batch = batch[: max_images - seen].float().cpu()
        if batch.shape[0] == 0:
            break
        kept.append(batch)
        seen += batch.shape[0]
        if seen >= max_images:
            break
    if not kept:
        raise ValueError("the tokenizer fit got no images")
    return torch.cat(kept)


def fit_conv_vae(images: Iterable[torch.Tensor], patch_size: int, latent_dim: int, *, max_images: int,
                 steps: int, lr: float, batch: int, beta: float, width: int, adv_weight: float, seed: int,
                 log: Callable[[str], None] | None = None) -> ConvVAETokenizer:
    """Fit on the first `max_images` images (held in memory: keep tokenizer.fit_images modest
    for large images)."""
    from ..seeding import derive_seed

    c = latent_channels_for(latent_dim, patch_size)
    x_all = _collect_images(images, max_images)
    n, C, H, W = x_all.shape
    if H % STRIDE or W % STRIDE:
        raise ValueError(f"conv-vae: images of {H}x{W} are not divisible by its stride {STRIDE}")
    g = torch.Generator().manual_seed(derive_seed(seed, _io.TAG_TOKENIZER_FIT, 3))
    with torch.random.fork_rng(devices=[]):  # module init draws from the global generator
        torch.manual_seed(derive_seed(seed, _io.TAG_TOKENIZER_FIT, 4))
        net = ConvVAE(c, width, C)
        disc = PatchDiscriminator(width, C) if adv_weight > 0 else None
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    dopt = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9)) if disc is not None else None
    adv_start = steps // 2
    batch = min(batch, n)
    pixels = C * H * W
    t0, last = time.time(), time.time()
    for step in range(steps):
        _io.set_fit_lr(opt, lr, step, steps)
        x = x_all[torch.randint(0, n, (batch,), generator=g)]
        mu, logvar = net.moments(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
        xr = net.decoder(z)
        rec = (xr - x).square().flatten(1).sum(1).mean()
        kl = 0.5 * (mu.square() + logvar.exp() - logvar - 1).flatten(1).sum(1).mean()
        # Divided by the pixel count so conv_lr means the same at any image size (Adam is
        # scale-free anyway; this keeps the logged value per pixel).
        loss = (rec + beta * kl) / pixels
        adv = None
        if disc is not None and step >= adv_start:
            adv = -disc(xr).mean()
            loss = loss + adv_weight * adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if disc is not None and step >= adv_start:
            dloss = (torch.relu(1 - disc(x)).mean() + torch.relu(1 + disc(xr.detach())).mean())
            dopt.zero_grad(set_to_none=True)
            dloss.backward()
            dopt.step()
        if log is not None and (time.time() - last > 10 or step == steps - 1):
            last = time.time()
            log(f"conv-vae fit: step {step + 1}/{steps}, recon {rec.item() / pixels:.4g} per pixel, "
                f"KL {kl.item():.4g} per image" + (f", adv {adv.item():.3g}" if adv is not None else "")
                + f", {last - t0:.0f}s")
    net.eval()
    with torch.no_grad():
        mse, kls = 0.0, 0.0
        for i in range(0, n, 64):
            xb = x_all[i:i + 64]
            mu, logvar = net.moments(xb)
            mse += float((net.decoder(mu) - xb).square().sum())
            kls += float(0.5 * (mu.square() + logvar.exp() - logvar - 1).sum())
    stats = _io.finite_stats(recon_mse=mse / (n * pixels), kl=kls / n)
    return ConvVAETokenizer(net, patch_size, latent_dim, width, "conv-vae", C, n,
                            {**stats, "beta": beta, "adv_weight": adv_weight, "steps": steps, "lr": lr,
                             "batch": batch})


def prepare(cfg, images: Callable[[], Iterable[torch.Tensor]], log: Callable[[str], None]) -> ConvVAETokenizer:
    from ..config import ConfigError

    t = cfg.tokenizer
    try:
        latent_channels_for(t.latent_dim, cfg.model.patch_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t0 = time.time()
    tok = fit_conv_vae(images(), cfg.model.patch_size, t.latent_dim, max_images=t.fit_images, steps=t.conv_steps,
                       lr=t.conv_lr, batch=t.conv_batch, beta=t.beta, width=t.conv_width,
                       adv_weight=t.adv_weight if t.adversarial else 0.0, seed=cfg.engine.seed, log=log)
    log(f"fitted the conv VAE ({tok.latent_channels} latent channels, width {tok.width}) on "
        f"{tok.num_images_fitted} images in {time.time() - t0:.1f}s; reconstruction MSE "
        f"{tok.fit['recon_mse']:.4g} per pixel, KL {tok.fit['kl']:.4g} per image")
    return tok
