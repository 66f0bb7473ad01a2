"""Methods (l-DAE, DiffMAE): the registry the engine, eval and bench build them through.

`build_method(cfg, device, ...)` is the only door: nothing outside methods/ and tokenizers/
names a concrete method or tokenizer. The method classes load on first use, so reading a
method's presets (config.py does) imports no torch.
"""

from __future__ import annotations

from typing import Any


def _methods() -> dict[str, type]:
    from .diffmae.method import DiffMAEMethod
    from .ldae.method import LDAEMethod
    return {"ldae": LDAEMethod, "diffmae": DiffMAEMethod}


def build_method(cfg, device, rank: int = 0, world_size: int = 1, tokenizer=None, kernels: str | None = None):
    """The method cfg.objective.method names; call its prepare() before training (or pass the
    tokenizer it should use). `kernels` overrides engine.kernels (evaluation uses 'auto')."""
    methods = _methods()
    name = cfg.objective.method
    if name not in methods:
        raise ValueError(f"objective.method={name!r} is not a known method; known: {', '.join(methods)}")
    return methods[name](cfg, device, rank=rank, world_size=world_size, tokenizer=tokenizer, kernels=kernels)


def __getattr__(name: str) -> Any:
    if name == "METHODS":
        return _methods()
    if name == "Method":
        from .base import Method
        return Method
    if name == "Batch":
        from ..batch import Batch
        return Batch
    raise AttributeError(name)


__all__ = ["METHODS", "Batch", "Method", "build_method"]
