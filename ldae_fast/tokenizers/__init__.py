"""Tokenizers: the map between image patches and the latent a method adds its noise in.

The registry is the only way the rest of the package reaches a tokenizer: `prepare_tokenizer`
builds the one the config names (fitting or loading it), `tokenizer_from_state` rebuilds a saved
one from its tensors and metadata (which name their kind).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from . import pca, pixel
from .base import Tokenizer
from .pca import PCATokenizer, TokenizerMismatch, fit_pca
from .pixel import PixelTokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    prepare: Callable[..., Tokenizer]
    """(cfg, images: () -> iterable of (B, C, H, W) batches, log) -> the run's tokenizer."""
    from_state: Callable[[dict, dict], Tokenizer]
    """(tensors, metadata) -> the tokenizer they describe."""


TOKENIZERS: dict[str, TokenizerSpec] = {
    "pca": TokenizerSpec(pca.prepare, PCATokenizer.from_state),
    "pixel": TokenizerSpec(pixel.prepare, PixelTokenizer.from_state),
}


def _spec(kind: str, where: str) -> TokenizerSpec:
    if kind not in TOKENIZERS:
        raise ValueError(f"{where}={kind!r} is not a known tokenizer; known: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind]


def fit_config(cfg):
    """The config whose training stream a tokenizer is fitted on: center crops, no flip, whatever
    the run's augmentation (l-DAE fits its PCA on un-augmented patches)."""
    import dataclasses

    if cfg.data.crop == "center":
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, crop="center"))


def prepare_tokenizer(cfg, images: Callable[[], Iterable[torch.Tensor]], log: Callable[[str], None] = print
                      ) -> Tokenizer:
    return _spec(cfg.tokenizer.kind, "tokenizer.kind").prepare(cfg, images, log)


def tokenizer_from_state(tensors: dict[str, torch.Tensor], meta: dict) -> Tokenizer:
    return _spec(meta.get("kind", "pca"), "the saved tokenizer's kind").from_state(tensors, meta)


__all__ = ["TOKENIZERS", "PCATokenizer", "PixelTokenizer", "Tokenizer", "TokenizerMismatch", "TokenizerSpec",
           "fit_config", "fit_pca", "prepare_tokenizer", "tokenizer_from_state"]
