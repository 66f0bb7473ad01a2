"""MAE's section of the run config (`--mae.field=value`). Plain data that validates itself with the
config mechanism's checks (config.py); the spec registers it, and the old spellings of its fields
(`objective.mask_ratio`, `objective.norm_pix_loss`: RENAMED), so saved configs and command lines
that use them still load."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import _check


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder, per sample."""
    norm_pix_loss: bool = False
    """Predict per-patch normalised pixels (MAE's best target) instead of pixels."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.mask_ratio < 1.0, f"mae.mask_ratio={self.mask_ratio} must lie in [0, 1)")


RENAMED = {f"objective.{k}": f"mae.{k}" for k in ("mask_ratio", "norm_pix_loss")}
