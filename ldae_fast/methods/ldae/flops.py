"""l-DAE's training FLOPs per image: the encoder-decoder on every token, forward and backward."""

from __future__ import annotations

from ...config import ModelConfig
from .config import LDAEConfig
from .model import flops_per_image


def train_flops_per_image(mcfg: ModelConfig, net: LDAEConfig, img_size: int) -> tuple[float, float]:
    """(forward, training) FLOPs per image; training = 3 x forward. The forward count follows
    ldae.layout: 'dit' has no class token (N tokens, not N + 1), no decoder embedding, one sigma
    embedder and its adaLN maps read c of width config.cond_width (docs/model.md)."""
    fwd = flops_per_image(mcfg, net, img_size)
    return fwd, 3.0 * fwd
