"""Noise schedules and loss weights of the l-DAE trajectory.

Every schedule maps t in [0, 1] (one value per sample) to (gamma_t, sigma_t) with
z_t = gamma_t z0 + sigma_t eps; t = 0 is clean. Continuous t; the DDPM schedule is discrete in
the paper and is evaluated here at step round(t * (T - 1)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ddpm import ddpm_betas
from .config import SCHEDULE_NAMES


def sigma_linear(t: torch.Tensor, sigma_max: float = math.sqrt(2.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """The final recipe: gamma_t = 1, sigma_t = sigma_max * t (0 .. sqrt 2)."""
    return torch.ones_like(t), sigma_max * t


def ddpm_linear_beta(
    t: torch.Tensor, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM: beta linear from 1e-4 to 0.02 over T steps, gamma^2 = prod(1 - beta) = alpha_bar,
    sigma^2 = 1 - alpha_bar (variance preserving)."""
    betas = ddpm_betas(num_timesteps, beta_start, beta_end, device=t.device)
    alpha_bar = torch.cumprod(1.0 - betas, 0)
    idx = (t.double().clamp(0, 1) * (num_timesteps - 1)).round().long()
    ab = alpha_bar[idx]
    return ab.sqrt().to(t.dtype), (1 - ab).sqrt().to(t.dtype)


def linear_gamma2(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma^2 falls linearly from 1 to 0, variance preserving: sigma^2 = 1 - gamma^2."""
    g2 = (1.0 - t).clamp(0, 1)
    return g2.sqrt(), (1.0 - g2).sqrt()


def single_level(t: torch.Tensor, sigma: float = 1.0 / 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One noise level for every t: gamma = 1, sigma fixed (l-DAE Sec. 4.3 tries sigma = 1/3)."""
    return torch.ones_like(t), torch.full_like(t, sigma)


@dataclass(frozen=True)
class Schedule:
    gamma_sigma: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    """(t, sigma_max, num_timesteps, single_sigma) -> (gamma_t, sigma_t)."""
    variance_preserving: bool
    """gamma^2 + sigma^2 = 1 (else gamma = 1)."""


# noise.schedule's names: the one list (config validates against it).
SCHEDULES: dict[str, Schedule] = {
    "sigma_linear": Schedule(lambda t, sigma_max, T, single: sigma_linear(t, sigma_max), False),
    "ddpm_linear_beta": Schedule(lambda t, sigma_max, T, single: ddpm_linear_beta(t, T), True),
    "linear_gamma2": Schedule(lambda t, sigma_max, T, single: linear_gamma2(t), True),
    "single_level": Schedule(lambda t, sigma_max, T, single: single_level(t, single), False),
}
assert tuple(SCHEDULES) == SCHEDULE_NAMES, "config.SCHEDULE_NAMES and SCHEDULES name the same schedules"


def gamma_for_sigma(sigma: float, schedule: str) -> float:
    """gamma paired with sigma by a schedule: 1 for sigma_linear and single_level; the
    variance-preserving schedules have gamma^2 + sigma^2 = 1."""
    if not SCHEDULES[schedule].variance_preserving:
        return 1.0
    if sigma > 1:
        raise ValueError(f"sigma={sigma} > 1 is not reachable with the variance-preserving "
                         f"schedule {schedule!r}")
    return math.sqrt(1.0 - sigma * sigma)


def loss_weight(kind: str, gamma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """lambda_t: 'inv_1p_sigma2' = 1 / (1 + sigma^2) (final recipe), 'uniform' = 1, 'gamma2' =
    gamma^2 (l-DAE Table 3's z0 row: the eps loss rewritten for a z0 target on a VP schedule)."""
    if kind == "inv_1p_sigma2":
        return 1.0 / (1.0 + sigma.square())
    if kind == "uniform":
        return torch.ones_like(sigma)
    if kind == "gamma2":
        return gamma.square()
    raise ValueError(f"unknown loss weight {kind!r}; known: inv_1p_sigma2, uniform, gamma2")


def gamma_sigma(t: torch.Tensor, schedule: str, sigma_max: float = math.sqrt(2.0),
                num_timesteps: int = 1000, single_sigma: float = 1.0 / 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on the schedule's name (config: noise.schedule)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[schedule].gamma_sigma(t, sigma_max, num_timesteps, single_sigma)
