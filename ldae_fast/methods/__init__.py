"""The method registry: the one list of method names, and the doors the engine, eval, bench and
CLIs use to reach a method. Nothing outside methods/ and tokenizers/ names a concrete method.
Importing it registers every method (and, through data/registry.py, every data source) with the
config mechanism (config_registry.py), so whoever parses a config imports this package first.

A new method is a folder methods/<name>/ exporting `SPEC` (a MethodSpec) plus one line below.
The specs are light: a method's code (and torch) loads when one of its entries is called.
"""

from __future__ import annotations

from typing import Any

from ..config_registry import register_method
from ..data import registry as _data_sources  # noqa: F401 (registers data.source's names)
from .diffmae import SPEC as _DIFFMAE
from .ldae import SPEC as _LDAE
from .ldae.config import NoiseConfig
from .mae import SPEC as _MAE
from .spec import MethodSpec

METHODS: dict[str, MethodSpec] = {s.name: s for s in (_LDAE, _DIFFMAE, _MAE)}
# Each method's config sections, names and presets go into the config mechanism, which checks and
# composes configs with them: importing this package is what a config parser needs first.
for _spec in METHODS.values():
    register_method(_spec)


def spec_for(cfg_or_name) -> MethodSpec:
    """The MethodSpec of a config's objective.method (or of a name)."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.objective.method
    if name not in METHODS:
        raise ValueError(f"objective.method={name!r} is not a known method; known: {', '.join(METHODS)}")
    return METHODS[name]


def build_method(cfg, device, rank: int = 0, world_size: int = 1, tokenizer=None, kernels: str | None = None):
    """The method cfg.objective.method names; call its prepare() before training (or pass the
    tokenizer it should use). `kernels` overrides engine.kernels (evaluation uses 'auto')."""
    return spec_for(cfg).build_method(cfg, device, rank=rank, world_size=world_size, tokenizer=tokenizer,
                                      kernels=kernels)


def all_presets() -> dict[str, dict[str, Any]]:
    """Every method's named presets (MethodSpec.presets), by preset name."""
    out: dict[str, dict[str, Any]] = {}
    for spec in METHODS.values():
        clash = set(out) & set(spec.presets)
        if clash:
            raise ValueError(f"preset name(s) {sorted(clash)} of method {spec.name!r} are taken")
        out.update(spec.presets)
    return out


def ablation_rows() -> dict[str, Any]:
    """Every method's named ablation rows (MethodSpec.rows), by row name."""
    return {name: row for spec in METHODS.values() for name, row in spec.rows().items()}


def build_model(cfg, kernels: str = "auto"):
    """The network cfg's method trains, for cfg.data.img_size inputs. `kernels` is engine.kernels:
    with model.fused_adaln it decides where the fused kernel runs."""
    return spec_for(cfg).build_model(cfg, kernels)


def __getattr__(name: str) -> Any:
    if name == "Method":
        from .base import Method
        return Method
    if name == "Batch":
        from ..batch import Batch
        return Batch
    raise AttributeError(name)


__all__ = ["METHODS", "all_presets", "Batch", "Method", "MethodSpec", "ablation_rows", "NoiseConfig", "build_method", "build_model", "spec_for"]
