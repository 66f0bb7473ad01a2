"""Feature learning in diffusion models vs classification (Han, Huang, Cao, Zou, ICLR 2025).

Two-layer networks with quadratic activation on two-patch data (a signal patch and a Gaussian
noise patch): a denoiser trained on the DDPM loss and a classifier trained on the logistic loss,
compared by how much each learns the signal versus memorizes the noise. Run it with
`ldae-fast featlearn synthetic|noisy-mnist` or `python -m ldae_fast.featlearn ...`.
"""

from .cli import main

__all__ = ["main"]
