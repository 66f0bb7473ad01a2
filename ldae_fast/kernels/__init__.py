"""Triton kernels of ldae-fast, one op per module, each in three layers: @triton.jit kernel ->
host launcher with input checks -> torch.autograd.Function / torch.library op (``ldae::*``, so
torch.compile traces around it). Plain-PyTorch twins live in ``ldae_fast.reference``.

On CPU the kernels run only in the Triton interpreter (TRITON_INTERPRET=1 set before triton is
first imported); otherwise pass ``kernels='reference'`` or call ``ldae_fast.reference`` directly.
"""

from __future__ import annotations

import torch

from . import _common
from .adaln_norm import adaln_layernorm
from .noise import _latent_noise_kernel, latent_noise, latent_noise_counter_span
from .pca_loss import pca_loss


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton path can run here (see `_common.triton_available`), asking one of our
    kernels how it was defined: all of them are defined by this package's import, together."""
    return _common.triton_available(device, kernel=_latent_noise_kernel)


__all__ = ["adaln_layernorm", "latent_noise", "latent_noise_counter_span", "pca_loss", "triton_available"]
