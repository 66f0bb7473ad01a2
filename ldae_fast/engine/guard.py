"""Run guards: stop a diverging run, and never let a non-finite state reach a checkpoint.

Both read device values only when the loop already syncs (a log line, a checkpoint), so a
training step itself never waits on the host.
"""

from __future__ import annotations

import math

import torch

from .. import methods  # noqa: F401 (registers the methods' config sections, names and presets)
from ..errors import NonFiniteLoss, UserError


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




# model.* fields that change how the network runs, never which tensors it holds: everything else
# in the model section may define the network, so a field added later is compared by default.
_RUNTIME_ONLY = frozenset({"size", "attn_backend", "grad_checkpointing", "fused_adaln"})
# Fields outside the model section that fix the saved state (the network's input, the tokenizer).
_OTHER_SHAPE_FIELDS = (("data", "img_size"), ("tokenizer", "latent_dim"))
# Differences that change a resumed run even where the network's tensors keep their shapes
# (heads split the same weights another way; the tokenizer's d and the input size are the method's).
_ALWAYS = frozenset({"model.num_heads", "model.decoder_heads", "model.patch_size", "data.img_size",
                     "tokenizer.latent_dim"})


def _tensor_shapes(cfg) -> dict | None:
    """{name: shape} of the network `cfg` builds, built on the meta device (no memory, no init);
    None when it cannot be built that way."""
    from ..methods import build_model

    try:
        with torch.device("meta"):
            net = build_model(cfg)
        return {k: tuple(v.shape) for k, v in net.state_dict().items()}
    except Exception:  # noqa: BLE001 - then the field comparison alone decides
        return None


def _saved_config(saved: dict):
    from ..config import Config, sanitize_stored_config

    try:
        return Config.from_dict(sanitize_stored_config(saved, "the checkpoint"))
    except Exception:  # noqa: BLE001 - an old or hand-edited config
        return None


def model_shape_diff(saved: dict, cfg) -> list[str]:
    """'section.field saved -> now' for each network-defining field that differs: the model.*
    fields but the runtime-only ones, data.img_size, tokenizer.latent_dim, and the method's own
    MethodSpec.shape_fields (as MethodSpec.resolved reads them: l-DAE's adaln_dim as the width
    it resolves to). A field that does not change the network (the tensors
    both configs build, on the meta device, have the same names and shapes) is let through,
    unless it changes the run all the same (_ALWAYS)."""
    import dataclasses

    from ..config import migrate
    from ..methods import spec_for

    try:  # fields that moved to a method's section are compared where they live now
        saved = migrate(saved)
    except Exception:  # noqa: BLE001 - an old or hand-edited config: compared as stored
        pass
    out = []
    was_model = saved.get("model") or {}
    # A saved config stores intent (0: from model.size): compare both sides as they read, resolved.
    before = _saved_config(saved)
    view = before.model if before is not None else None
    for f in dataclasses.fields(cfg.model):
        if f.name in _RUNTIME_ONLY or f.name not in was_model:
            continue
        now = getattr(cfg.model, f.name)
        was = getattr(view, f.name) if view is not None else was_model[f.name]
        if was != now:
            out.append(f"model.{f.name} {was} -> {now}")
    for sec, name in _OTHER_SHAPE_FIELDS:
        was = (getattr(getattr(before, sec), name) if before is not None else (saved.get(sec) or {}).get(name))
        now = getattr(getattr(cfg, sec), name)
        if was is not None and was != now:
            out.append(f"{sec}.{name} {was} -> {now}")
    if out and not all(d.split()[0] in _ALWAYS for d in out):
        shapes_now, shapes_was = _tensor_shapes(cfg), (_tensor_shapes(before) if before is not None else None)
        if shapes_now is not None and shapes_now == shapes_was:
            out = [d for d in out if d.split()[0] in _ALWAYS]
    # The method's own wiring fields; a saved config older than a field holds its default.
    spec = spec_for(cfg)
    for (sec, name), default in spec.shape_fields:
        key, stored = f"{sec}.{name}", saved.get(sec) or {}
        was = stored.get(name, default)
        if before is not None:
            then = before
            if name not in stored:
                try:
                    then = before.replace(**{sec: dataclasses.replace(getattr(before, sec), **{name: default})})
                except Exception:  # noqa: BLE001 - compared as stored
                    then = None
            if then is not None:
                was = spec.resolved(then).get(key, getattr(getattr(then, sec), name))
        now = spec.resolved(cfg).get(key, getattr(getattr(cfg, sec), name))
        if was != now and key not in {d.split()[0] for d in out}:
            out.append(f"{sec}.{name} {was} -> {now}")
    return out


def state_dict_mismatch(e: RuntimeError) -> str | None:
    """The parameters named by a load_state_dict shape or key error, as one short phrase; None when
    `e` is some other RuntimeError."""
    import re

    text = str(e)
    if "size mismatch for" not in text and "Missing key(s)" not in text and "Unexpected key(s)" not in text:
        return None
    names = re.findall(r"size mismatch for ([\w.]+)", text)
    for what in ("Missing", "Unexpected"):
        m = re.search(what + r' key\(s\) in state_dict: ([^\n]*?)\.\s*(?:\n|$|Unexpected|size)', text)
        if m:
            names += [n.strip().strip('"') for n in m.group(1).split(",")]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return shown or "parameters differ"


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
