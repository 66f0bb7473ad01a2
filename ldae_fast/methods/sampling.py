"""Sampling with a trained network: what figures and generation run, with training's own noising.

l-DAE's is one denoising pass per noise level (the paper's Figure 8). A method passes its own
noising function, so the schedule's gamma, the tokenizer and noise.input_scaling are the ones
training used. DiffMAE's reverse-diffusion inpainting loop belongs here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..device import eval_mode


def device_of(model: nn.Module) -> torch.device:
    """Where a model's parameters are (CPU for one without any): where its sampler runs."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def denoise_at_levels(model: nn.Module, images: torch.Tensor, sigmas: Sequence[float],
                      gamma_of: Callable[[float], float],
                      noisy_input: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      condition: Callable[[torch.Tensor], dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(x_in, x_hat) per sigma]: `noisy_input(x, gamma, sigma)` noises as training does (the same
    eps at every level when it is keyed alike), at the gamma `gamma_of(sigma)` the method's
    schedule pairs with sigma; the model denoises in one pass."""
    B = images.shape[0]
    out = []
    with eval_mode(model):
        for s in sigmas:
            sig = torch.full((B,), float(s), device=images.device)
            gam = torch.full((B,), gamma_of(float(s)), device=images.device)
            x_in = noisy_input(images, gam, sig)
            out.append((x_in, model(x_in, **condition(sig))))
    return out
