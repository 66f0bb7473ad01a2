"""The probe sweep over depth k and noise step t (l-DAE App. A's tables), on the feature store.

A plan has one *pass* per t: a view of the network conditioned on that t and cut after the
deepest k asked, read after every k of the list in the same forward (ProbeView.pooled_depths).
So an image costs one forward per t, never one per (k, t): t changes the conditioning every block
reads (and, with noisy input, the input itself), so nothing is shared across t, and one forward
per t is the least any sweep over t can cost. The data is read once for all of them.

Each (k, t) is its own feature store, under the key a single probe at that (k, t) gives (its
`entry` view is that probe's view), so a sweep reuses a single run's store and the other way
round. Heads for every (k, t, lr) train in one pass over the stores (fast_heads.train_heads_many),
each (k, t)'s lr picked on the held-out part of train.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

from torch import nn

from .features import probe_encoder, probe_sigma, probe_view


@dataclass
class SweepEntry:
    k: int
    """Blocks read (0: all the encoder's), as eval.probe_depth counts them."""
    t: int
    sigma: float
    input: str
    view: nn.Module
    """The single probe's view at this (k, t): its weights and kind key the store."""
    probe_key: dict


@dataclass
class SweepPass:
    t: int
    view: nn.Module
    """Conditioned on t, read at every entry's k in one forward."""
    entries: list[SweepEntry] = field(default_factory=list)


def parse_ints(flag: str, text: Optional[str]) -> list[int]:
    """'9,10,11' -> [9, 10, 11] (duplicates dropped, order kept); ValueError naming the flag."""
    if text is None:
        return []
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: comma-separated whole numbers") from None
    if not vals or min(vals) < 0:
        raise ValueError(f"{flag} {text!r}: one or more whole numbers >= 0")
    return list(dict.fromkeys(vals))


def at(cfg, *, t: Optional[int] = None, k: Optional[int] = None):
    """cfg with eval.probe_t / eval.probe_depth replaced (validated like config values)."""
    over = {n: v for n, v in (("probe_t", t), ("probe_depth", k)) if v is not None}
    return cfg.replace(eval=dataclasses.replace(cfg.eval, **over))


def probe_key(cfg) -> dict:
    """What of the probe settings changes a feature, for the store's key: the step t (None when
    eval.probe_sigma gives sigma directly), its sigma, the input and the depth k; for an encoder
    that takes no noise level (MethodSpec.probe_conditioned false) the depth alone."""
    from ..methods import spec_for

    e = cfg.eval
    if not spec_for(cfg).probe_conditioned:
        return dict(t=None, sigma=0.0, input="clean", depth=e.probe_depth)
    return dict(t=e.probe_t if e.probe_sigma < 0 else None, sigma=probe_sigma(cfg), input=e.probe_input,
                depth=e.probe_depth)


def single_view(model: nn.Module, cfg, method, device) -> nn.Module:
    """The view a probe at cfg's (depth, t) reads: probe_encoder, then the method's probe view."""
    return probe_view(probe_encoder(model, cfg), cfg, method.to(device))


def plan(model: nn.Module, cfg, method, depths: Sequence[int], ts: Sequence[int], device) -> list[SweepPass]:
    """One SweepPass per t of `ts` with an entry per k of `depths` (an empty list: the config's
    own). ValueError (ConfigError) for a sweep this checkpoint cannot run."""
    if method is None:
        raise ValueError("a probe sweep needs a training checkpoint; an exported encoder's conditioning "
                         "is folded at sigma = 0 and it has no decoder blocks")
    e = cfg.eval
    if ts and e.probe_sigma >= 0:
        raise ValueError(f"--probe-ts: eval.probe_sigma={e.probe_sigma:g} fixes sigma whatever t is; "
                         "leave it unset (-1) to sweep t")
    depths = list(depths) or [e.probe_depth]
    ts = list(ts) or [e.probe_t]
    n = len(model.encoder.blocks)
    deepest = max(k or n for k in depths)
    sigmas: dict[float, int] = {}
    passes = []
    for t in ts:
        ct = at(cfg, t=t)
        s = probe_sigma(ct)
        if s in sigmas:
            raise ValueError(f"--probe-ts: t={sigmas[s]} and t={t} give the same sigma {s:g} (this encoder "
                             "takes no noise level, or the schedule is flat there): sweep depths only")
        sigmas[s] = t
        p = SweepPass(t, single_view(model, at(ct, k=deepest), method, device))
        for k in depths:
            ckt = at(ct, k=k)
            p.entries.append(SweepEntry(k, t, s, ckt.eval.probe_input, single_view(model, ckt, method, device),
                                        probe_key(ckt)))
        passes.append(p)
    return passes


def read_pass(p: SweepPass, x, pool: str, entries: Sequence[SweepEntry]) -> list:
    """`entries`' features of images x: one forward of the pass's view where it reads several
    depths at once, else one forward per entry."""
    if hasattr(p.view, "pooled_depths"):
        return p.view.pooled_depths(x, [en.k for en in entries], pool)
    from .features import pool_features

    return [pool_features(en.view, x, pool) for en in entries]


def sweep_table(records: Sequence[dict], paper: dict) -> str:
    """App. A's table: one row per (k, t), the checkpoint's top-1 beside the random-init floor
    and the paper's number at that (k, t) where it printed one."""
    keys = list(dict.fromkeys((r["k"], r["t"], r["input"]) for r in records))
    encs = list(dict.fromkeys(r["encoder"] for r in records))
    by = {(r["k"], r["t"], r["input"], r["encoder"]): r for r in records}
    top = paper.get("top1", {})
    head = ["k", "t", "sigma", "input"] + [f"{n} top-1 (blr)" for n in encs] + ["paper top-1"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---:"] * 3 + ["---"] + ["---:"] * (len(encs) + 1)) + " |"]
    for k, t, inp in keys:
        first = next(r for r in records if (r["k"], r["t"], r["input"]) == (k, t, inp))
        cells = [str(k) if k else "all", str(t), f"{first['sigma']:.4g}", inp]
        for n in encs:
            r = by.get((k, t, inp, n))
            cells.append(f"{r['top1']:.2f} ({r['blr']:g})" if r else "-")
        p = top.get((k, t, inp))
        cells.append(f"{p:.1f}" if p is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_notes(paper: dict, forwards_per_image: int, seconds: float) -> str:
    src = paper.get("source")
    scale = ("" if not src else
             f" Paper column: {src}; this checkpoint is that network, so the columns compare if its "
             "training matched too." if paper.get("matches") else
             f" Paper column: {src}; this checkpoint is not at that scale, so the column is the "
             "paper's trend over k and t, not a number to match.")
    return (f"Probe sweep: one head per (k, t, base lr), the lr chosen per (k, t) on a held-out part of "
            f"train (the blr in brackets); features from {forwards_per_image} forward(s) per image "
            f"(one per t, every k read from it), {seconds:.1f}s for the sweep in all (extraction and heads: "
            f"the time of every sweep row in the table above).{scale}")


def sweep_report(records: Sequence[dict], cfg) -> dict:
    """{'markdown': notes and table, 'json': the records with the paper's number beside each} of
    a sweep's records (StreamingEval.linear_fast_sweep), the paper's numbers from the method's
    MethodSpec.paper_probe_sweep."""
    from ..methods import spec_for

    paper = dict(spec_for(cfg).paper_probe_sweep(cfg))
    top = paper.get("top1", {})
    fwd = max(r["forwards_per_image"] for r in records)
    secs = {r["encoder"]: r["seconds"] for r in records}
    md = sweep_notes(paper, fwd, sum(secs.values())) + "\n\n" + sweep_table(records, paper)
    keep = ("k", "t", "sigma", "input", "encoder", "top1", "top5", "blr", "lr", "heldout_top1", "epochs",
            "batch_size", "feature_dim", "train_images", "val_images", "heldout_images")
    rows = [dict({f: r[f] for f in keep if f in r}, paper_top1=top.get((r["k"], r["t"], r["input"])),
                 paper_source=paper.get("source"), paper_scale_matches=bool(paper.get("matches")))
            for r in records]
    return dict(markdown=md, json=rows)


__all__ = ["sweep_report", "SweepEntry", "SweepPass", "parse_ints", "plan", "probe_key", "read_pass", "sweep_table",
           "sweep_notes", "at", "single_view"]
