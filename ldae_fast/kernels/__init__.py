"""Triton kernels of ldae-fast, one op per module, each in three layers: @triton.jit kernel ->
host launcher with input checks -> torch.autograd.Function / torch.library op (``ldae::*``, so
torch.compile traces around it). Plain-PyTorch twins live in ``ldae_fast.reference``.

On CPU the kernels run only in the Triton interpreter (TRITON_INTERPRET=1 set before triton is
first imported); otherwise pass ``kernels='reference'`` or call ``ldae_fast.reference`` directly.
"""

from ._common import triton_available
from .adaln_norm import adaln_layernorm
from .noise import latent_noise, latent_noise_counter_span
from .pca_loss import pca_loss

__all__ = ["adaln_layernorm", "latent_noise", "latent_noise_counter_span", "pca_loss", "triton_available"]
