"""Evaluation: linear probe (full and fast), kNN, fine-tuning, denoising figure, and the
`ldae-fast eval` driver that runs them beside a random-weights baseline."""

from .features import extract_features
from .knn import knn_classify
from .lars import LARS
from .linear_probe import linear_probe, linear_probe_fast, quick_probe, train_head_cached

__all__ = [
    "LARS",
    "extract_features",
    "knn_classify",
    "linear_probe",
    "linear_probe_fast",
    "quick_probe",
    "train_head_cached",
]
