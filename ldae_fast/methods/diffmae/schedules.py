"""DiffMAE's discrete noise schedule: DDPM's linear betas raised to a power rho.

beta_t = (1e-4 + (0.02 - 1e-4) (t - 1) / (T - 1)) ** rho for t = 1..T (index t - 1 here),
alpha_t = 1 - beta_t, abar_t = prod_{s <= t} alpha_s, and the forward process
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. Since every beta < 1, a smaller rho makes each beta
larger: more noise at every step (rho = 1 is DDPM's schedule).

Respacing (for a sampler with fewer steps) follows Nichol & Dhariwal: a subsequence of timesteps
keeps its abar values and gets the betas that reproduce them, beta'_i = 1 - abar_{s_i} / abar_{s_{i-1}}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ddpm import ddpm_betas


@dataclass
class DiffusionSchedule:
    betas: torch.Tensor
    """(T,) float64; index i is DDPM's step t = i + 1."""
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def ddpm(cls, num_timesteps: int = 1000, rho: float = 1.0) -> DiffusionSchedule:
        return cls(ddpm_betas(num_timesteps, rho=rho))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar (T,) float64."""
        return torch.cumprod(1.0 - self.betas, 0)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) as float32 for integer steps t (any shape) in [0, T).

        The tables are computed in float64 once per device and kept there, so a training step
        indexes them without a host-to-device copy."""
        key = str(t.device)
        if key not in self._tables:
            ab = self.alphas_cumprod
            self._tables[key] = (ab.sqrt().float().to(t.device), (1.0 - ab).sqrt().float().to(t.device))
        a, s = self._tables[key]
        return a[t.long()], s[t.long()]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t for x0 (B, ...) at per-sample steps t (B,)."""
        a, s = self.coefficients(t)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return a.view(shape) * x0.float() + s.view(shape) * eps.float()

    def respaced(self, steps: int) -> tuple[torch.Tensor, DiffusionSchedule]:
        """(timesteps (steps,) int64 ascending, the schedule over them): `steps` evenly strided
        timesteps from 0 to T - 1, the last always T - 1, with the betas that keep their abar."""
        T = self.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"sampling steps {steps} must lie in 1..{T}")
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().unique()
        ab = self.alphas_cumprod[ts]
        prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return ts, DiffusionSchedule(1.0 - ab / prev)

    def posterior(self, i: int) -> tuple[float, float, float]:
        """q(x_{i-1} | x_i, x_0) = N(c0 x_0 + ct x_i, var) at index i: (c0, ct, var). At i = 0
        (abar_{-1} = 1) c0 = 1, ct = 0 and var = 0: the last step returns the predicted x_0."""
        ab = self.alphas_cumprod
        ab_t = float(ab[i])
        ab_prev = float(ab[i - 1]) if i > 0 else 1.0
        beta = float(self.betas[i])
        c0 = ab_prev ** 0.5 * beta / (1.0 - ab_t)
        ct = (1.0 - beta) ** 0.5 * (1.0 - ab_prev) / (1.0 - ab_t)
        var = (1.0 - ab_prev) / (1.0 - ab_t) * beta
        return c0, ct, var
