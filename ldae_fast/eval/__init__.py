"""Evaluation: linear probe (full and fast), kNN, fine-tuning, the method's figure, and the
`ldae-fast eval` driver that runs them beside a random-weights baseline."""

import importlib

# name -> submodule, imported on first use (PEP 562): `ldae-fast eval --help` and
# `ldae-fast ablate --help` answer before torch is imported.
_EXPORTS = {"LARS": "lars", "extract_features": "features", "knn_classify": "knn",
            **dict.fromkeys(("linear_probe", "linear_probe_fast", "quick_probe", "train_head_cached"),
                            "linear_probe")}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "LARS",
    "extract_features",
    "knn_classify",
    "linear_probe",
    "linear_probe_fast",
    "quick_probe",
    "train_head_cached",
]
