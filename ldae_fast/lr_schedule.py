"""The learning-rate schedule every trainer here uses: linear warm-up, then half-cycle cosine.

`warmup_cosine` reads a continuous position (epochs or steps, fractions allowed: MAE's
per-iteration form, which the probe and fine-tune recipes follow); `lr_at_step` is the same
schedule over whole steps, where step s's warm-up counts s itself, so step 0 already learns.
"""

from __future__ import annotations

import math


def warmup_cosine(t: float, base_lr: float, warmup: float, total: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 at t = 0 to base_lr at t = warmup, then half-cycle cosine down to
    min_lr at t = total (and min_lr after)."""
    if t < warmup:
        return base_lr * t / warmup
    span = max(total - warmup, 1e-12)
    frac = min(max((t - warmup) / span, 0.0), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def lr_at_step(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """The lr of step `step` (0-based): base_lr (step + 1) / warmup_steps during the warm-up, then
    `warmup_cosine` from base_lr at step warmup_steps to min_lr at total_steps (at least one step
    after the warm-up)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return warmup_cosine(step, base_lr, warmup_steps, max(total_steps, warmup_steps + 1), min_lr)
