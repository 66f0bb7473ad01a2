"""The pixel tokenizer of the paper's trajectory: noise goes straight onto the pixels of a patch.

It is the linear tokenizer with the identity basis and a zero mean (d = D = C p^2), so the fused
noise kernel and the PCA-space loss apply unchanged (the loss then weighs every pixel alike).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .pca import PCATokenizer


class PixelTokenizer(PCATokenizer):
    @classmethod
    def create(cls, patch_size: int, channels: int = 3) -> PixelTokenizer:
        D = channels * patch_size**2
        return cls(torch.eye(D), torch.zeros(D), torch.ones(D), patch_size, D, "pixel", channels, 0)


def prepare(cfg, images: Callable[[], Iterable[torch.Tensor]], log: Callable[[str], None]) -> PixelTokenizer:
    """Nothing to fit: `images` is never read."""
    return PixelTokenizer.create(cfg.model.patch_size)
