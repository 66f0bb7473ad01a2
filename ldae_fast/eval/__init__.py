"""Evaluation: linear probe (full and fast), kNN, fine-tuning, the method's figure, and the
`ldae-fast eval` driver that runs them beside a random-weights baseline."""

from ..lazy import lazy_exports

# name -> submodule, imported on first use (PEP 562): `ldae-fast eval --help` and
# `ldae-fast ablate --help` answer before torch is imported.
_EXPORTS = {"LARS": "lars", "extract_features": "features", "knn_classify": "knn",
            **dict.fromkeys(("linear_probe", "linear_probe_fast", "quick_probe", "train_head_cached"),
                            "linear_probe")}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = [
    "LARS",
    "extract_features",
    "knn_classify",
    "linear_probe",
    "linear_probe_fast",
    "quick_probe",
    "train_head_cached",
]
