"""Run guards: stop a diverging run, and never let a non-finite state reach a checkpoint.

Both read device values only when the loop already syncs (a log line, a checkpoint), so a
training step itself never waits on the host.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError


class NonFiniteLoss(RuntimeError, UserError):
    exit_code = 3
    category = "non-finite loss"


class Diverged(RuntimeError, UserError):
    exit_code = 8
    category = "divergence"


class DivergenceGuard:
    """Counts consecutive log checks whose mean gradient norm is non-finite or above `bound`
    (bound 0: only non-finite counts); `checks` in a row stop the run (checks 0: never)."""

    def __init__(self, bound: float, checks: int) -> None:
        self.bound, self.checks = bound, checks
        self.run = 0
        self.first_step: int | None = None

    def observe(self, step: int, grad_norm: float, good_checkpoint=None) -> None:
        bad = not math.isfinite(grad_norm) or (self.bound > 0 and grad_norm > self.bound)
        if not bad:
            self.run, self.first_step = 0, None
            return
        self.run += 1
        if self.first_step is None:
            self.first_step = step
        if self.checks and self.run >= self.checks:
            what = "non-finite" if not math.isfinite(grad_norm) else f"{grad_norm:.3g}"
            raise Diverged(
                f"training diverged: the gradient norm was non-finite or above "
                f"engine.diverge_grad_norm={self.bound:g} on {self.run} log lines in a row (since step "
                f"{self.first_step}; {what} at step {step}). Newest good checkpoint: "
                f"{good_checkpoint() if callable(good_checkpoint) else good_checkpoint}. Try a lower "
                "--optim.blr or --optim.clip_grad, or raise engine.diverge_grad_norm / diverge_checks.")


def first_non_finite(flag: torch.Tensor, reduce_max=None) -> int:
    """The step recorded in the device-side flag (-1: none), agreed across ranks: a host sync."""
    if reduce_max is not None:
        flag = reduce_max(flag)
    return int(flag.item())


def params_finite(*modules_or_dicts, reduce_max=None) -> bool:
    """Whether every floating tensor of the given modules / state dicts is finite (one sync)."""
    bad = None
    for m in modules_or_dicts:
        if m is None:
            continue
        tensors = m.state_dict().values() if hasattr(m, "state_dict") else m.values()
        for t in tensors:
            if torch.is_tensor(t) and t.is_floating_point() and t.numel():
                b = (~torch.isfinite(t)).any()
                bad = b if bad is None else bad | b.to(bad.device)
    if bad is None:
        return True
    flag = bad.to(torch.long)
    if reduce_max is not None:
        flag = reduce_max(flag)
    return int(flag.item()) == 0




# Fields that fix the shapes of the saved tensors.
_SHAPE_FIELDS = (("model", "width"), ("model", "encoder_depth"), ("model", "decoder_depth"),
                 ("model", "num_heads"), ("model", "mlp_ratio"), ("model", "patch_size"),
                 ("model", "cond"), ("data", "img_size"), ("tokenizer", "latent_dim"))


# DiffMAE's decoder wiring: which modules the decoder holds. A config saved before a field existed
# stores none and was built with the field's default (the value given here).
_DIFFMAE_SHAPE_FIELDS = ((("model", "decoder_kind"), "joint"), (("model", "decoder_topdown"), "last"))


def model_shape_diff(saved: dict, cfg) -> list[str]:
    """'section.field saved -> now' for each shape-defining field that differs."""
    out = []
    for sec, name in _SHAPE_FIELDS:
        was = (saved.get(sec) or {}).get(name)
        now = getattr(getattr(cfg, sec), name)
        if was is not None and was != now:
            out.append(f"{sec}.{name} {was} -> {now}")
    if cfg.objective.method == "diffmae":
        for (sec, name), default in _DIFFMAE_SHAPE_FIELDS:
            was = (saved.get(sec) or {}).get(name, default)
            now = getattr(getattr(cfg, sec), name)
            if was != now:
                out.append(f"{sec}.{name} {was} -> {now}")
    return out


def check_before_save(step: int, first_bad: torch.Tensor, model, ema, newest_good, reduce_max=None) -> None:
    """Raise NonFiniteLoss instead of letting a checkpoint hold NaN/inf (loss or weights)."""
    bad = first_non_finite(first_bad, reduce_max)
    if bad >= 0:
        raise NonFiniteLoss(f"loss became non-finite at step {bad}; not writing the checkpoint of step "
                            f"{step}. Newest good checkpoint: {newest_good}. Try a lower --optim.blr, "
                            "--optim.clip_grad, or --engine.precision=fp32.")
    if not params_finite(model, ema.state_dict() if ema is not None else None, reduce_max=reduce_max):
        raise NonFiniteLoss(f"the weights became non-finite by step {step} (the loss was still finite); not "
                            f"writing its checkpoint. Newest good checkpoint: {newest_good}. Try a lower "
                            "--optim.blr or --optim.clip_grad.")
