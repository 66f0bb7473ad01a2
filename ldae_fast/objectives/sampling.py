"""Sampling with a trained network: what figures and generation run, with training's own noising.

l-DAE's is one denoising pass per noise level (the paper's Figure 8). A method passes its own
noising function, so the schedule's gamma, the tokenizer and noise.input_scaling are the ones
training used. DiffMAE's reverse-diffusion inpainting loop belongs here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..device import eval_mode


def gamma_for_sigma(sigma: float, schedule: str) -> float:
    """gamma paired with sigma by a schedule: 1 for sigma_linear and single_level; the
    variance-preserving schedules have gamma^2 + sigma^2 = 1."""
    if schedule in ("sigma_linear", "single_level"):
        return 1.0
    if sigma > 1:
        raise ValueError(f"sigma={sigma} > 1 is not reachable with the variance-preserving "
                         f"schedule {schedule!r}")
    return math.sqrt(1.0 - sigma * sigma)


@torch.no_grad()
def denoise_at_levels(model: nn.Module, images: torch.Tensor, sigmas: Sequence[float], schedule: str,
                      noisy_input: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      condition: Callable[[torch.Tensor], dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(x_in, x_hat) per sigma]: `noisy_input(x, gamma, sigma)` noises as training does (the same
    eps at every level when it is keyed alike), the model denoises in one pass."""
    B = images.shape[0]
    out = []
    with eval_mode(model):
        for s in sigmas:
            sig = torch.full((B,), float(s), device=images.device)
            gam = torch.full((B,), gamma_for_sigma(float(s), schedule), device=images.device)
            x_in = noisy_input(images, gam, sig)
            out.append((x_in, model(x_in, **condition(sig))))
    return out
