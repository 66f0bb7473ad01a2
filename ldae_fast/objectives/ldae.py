"""The l-DAE objective: a batch of clean images in, a scalar loss out (no training-loop code).

Final recipe (DESIGN.md): t ~ U(0, 1) per sample, gamma_t = 1, sigma_t = sqrt(2) t; noise added to
the first d PCA components of each patch; the network sees the inverse-PCA noisy image and predicts
the clean image; loss weighted 1 / (1 + sigma^2) per sample and w_i = 1 / 0.1 across PCA components.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .. import reference, schedules
from ..config import Config
from ..markers import nvtx_range
from ..tokenizers import PCATokenizer

_MASK63 = (1 << 63) - 1


def resolve_kernels(mode: str, device: torch.device | str) -> str:
    """The one place that decides between the Triton kernels and the PyTorch reference.

    'auto': Triton on CUDA (when triton imports), the reference on CPU. 'triton' on CPU runs the
    kernels in the Triton interpreter and needs TRITON_INTERPRET=1 set before triton is imported.
    """
    device = torch.device(device)
    if mode == "reference":
        return "reference"
    if mode not in ("auto", "triton"):
        raise ValueError(f"kernels={mode!r}; choose auto, triton or reference")
    try:
        from ..kernels import triton_available
        have_triton = triton_available()
    except ImportError:
        have_triton = False
    if mode == "auto":
        return "triton" if (device.type == "cuda" and have_triton) else "reference"
    if not have_triton:
        raise RuntimeError("kernels='triton' was asked for but triton is not importable here; "
                           "install triton or use --kernels=reference")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels='triton' on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 "
                           "(before starting Python) or use --kernels=reference")
    return "triton"


def step_seed(base_seed: int, step: int, rank: int = 0, stream: int = 0) -> int:
    """A 63-bit seed keyed on (seed, step, rank, stream), so the noise of a step does not depend
    on what ran before it: a resumed run draws exactly what the uninterrupted run drew."""
    x = (base_seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB
         + stream * 0x2545F4914F6CDD1D) & _MASK63
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _MASK63
    x ^= x >> 29
    return x


@dataclass
class NoisyBatch:
    x_in: torch.Tensor
    """Network input, (B, C, H, W)."""
    sigma: torch.Tensor
    """Per-sample noise level (the conditioning), (B,)."""
    gamma: torch.Tensor
    lam: torch.Tensor
    """Per-sample loss weight, (B,)."""


class LDAEObjective:
    """Turns clean images into (noisy input, loss); holds the tokenizer and the kernel choice."""

    def __init__(self, cfg: Config, tokenizer: PCATokenizer, device: torch.device | str, rank: int = 0,
                 world_size: int = 1):
        self.cfg = cfg
        self.noise_cfg = cfg.noise
        self.p = cfg.model.patch_size
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.tok = tokenizer.to(self.device)
        self.backend = resolve_kernels(cfg.engine.kernels, self.device)
        if self.backend == "triton":
            from .. import kernels
            self._k = kernels
        # The loss needs only V_d: the identity in DESIGN.md avoids the (D, D) product per token.
        self.basis = self.tok.basis.contiguous()
        self.mean = self.tok.mean.contiguous()

    def noise_levels(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.noise_cfg
        gamma, sigma = schedules.gamma_sigma(t, n.schedule, n.sigma_max, n.num_timesteps)
        return gamma, sigma, schedules.loss_weight(n.loss_weight, gamma, sigma)

    def add_noise(self, x: torch.Tensor, step: int, t: torch.Tensor | None = None, micro: int = 0,
                  accum: int = 1) -> NoisyBatch:
        """Sample t per image (unless given) and noise x in PCA space; no gradient flows to x.

        Draws are keyed on the optimizer step and on the sample's place in the step's global batch:
        micro-batch m of `accum` on rank r holds rows (m * world + r) * B .. + B - 1. So N ranks x
        A accumulated micro-batches of B draw exactly what one process with batch N*A*B draws: a
        sharded or accumulated run is comparable to a single-device one.
        """
        if not 0 <= micro < accum:
            raise ValueError(f"micro={micro} must lie in [0, accum={accum})")
        B = x.shape[0]
        Bg, lo = B * self.world_size * accum, B * (micro * self.world_size + self.rank)
        seed = step_seed(self.cfg.engine.seed, step)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        if t is None:
            t = torch.rand(Bg, generator=gen, device=self.device)[lo:lo + B]
        gamma, sigma, lam = self.noise_levels(t.float())
        N = (x.shape[2] // self.p) * (x.shape[3] // self.p)
        with torch.no_grad():
            if self.backend == "triton":
                # The kernel's counter for element (b, n, i) is offset + (b*N + n)*d + i.
                x_in = self._k.latent_noise(x, self.basis, self.mean, gamma, sigma, self.p,
                                            seed=seed, offset=lo * N * self.tok.d)
            else:
                # The reference draws the whole global batch and keeps its rows: simple, and
                # it is the CPU / test path; each micro-batch pays for world x accum batches of
                # draws, which only matters with --kernels reference on a GPU.
                eps = torch.randn(Bg, N, self.tok.d, generator=gen, device=self.device)[lo:lo + B]
                x_in, _ = reference.latent_noise(x, self.basis, self.mean, gamma, sigma, eps, self.p)
            if self.noise_cfg.input_scaling:
                x_in = x_in / (gamma.square() + sigma.square()).sqrt().view(B, 1, 1, 1).to(x_in.dtype)
        return NoisyBatch(x_in, sigma, gamma, lam)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        n = self.noise_cfg
        if self.backend == "triton":
            return self._k.pca_loss(pred, target, self.basis, lam, self.p, n.low_weight, n.high_weight)
        return reference.pca_loss_fast(pred, target, self.basis, lam, self.p, n.low_weight, n.high_weight)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, step: int,
                 autocast_dtype: torch.dtype | None = None, micro: int = 0, accum: int = 1) -> torch.Tensor:
        with nvtx_range("noise"):
            nb = self.add_noise(x, step, micro=micro, accum=accum)
        if autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=autocast_dtype):
                pred = model(nb.x_in, nb.sigma)
        else:
            pred = model(nb.x_in, nb.sigma)
        with nvtx_range("loss"):
            return self.loss(pred, x, nb.lam)
