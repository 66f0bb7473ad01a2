"""Methods (l-DAE, DiffMAE): the registry the engine, eval and bench build them through.

`build_method(cfg, device, ...)` is the only door: nothing outside objectives/ and tokenizers/
names a concrete method or tokenizer.
"""

from __future__ import annotations

import torch

from ..batch import Batch
from .base import Method
from .diffmae import DiffMAEMethod
from .ldae import LDAEMethod

METHODS: dict[str, type] = {"ldae": LDAEMethod, "diffmae": DiffMAEMethod}


def build_method(cfg, device: torch.device | str, rank: int = 0, world_size: int = 1,
                 tokenizer=None, kernels: str | None = None) -> Method:
    """The method cfg.objective.method names; call its prepare() before training (or pass the
    tokenizer it should use). `kernels` overrides engine.kernels (evaluation uses 'auto')."""
    name = cfg.objective.method
    if name not in METHODS:
        raise ValueError(f"objective.method={name!r} is not a known method; known: {', '.join(METHODS)}")
    return METHODS[name](cfg, device, rank=rank, world_size=world_size, tokenizer=tokenizer, kernels=kernels)


__all__ = ["METHODS", "Batch", "Method", "build_method"]
