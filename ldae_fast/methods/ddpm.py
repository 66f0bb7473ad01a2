"""DDPM's linear beta schedule, shared by l-DAE's ddpm_linear_beta row and DiffMAE's rho schedule."""

from __future__ import annotations

import torch


def ddpm_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               rho: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """(T,) float64 betas: DDPM's linear schedule, each raised to rho (DiffMAE's knob; 1 is DDPM)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps={num_timesteps} must be >= 1")
    if not rho > 0:
        raise ValueError(f"rho={rho} must be > 0")
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64, device=device)
    return betas if rho == 1 else betas ** rho
