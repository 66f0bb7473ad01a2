"""The fast probe from a feature store: several heads (one per base lr) in one pass over the rows,
the lr picked on a held-out part of the training split, never on the validation split.

Each head is the MAE probe head (BatchNorm without affine, then a linear layer, LARS, warm-up +
cosine), trained on the same batches: the BatchNorm has no parameters, so one normalisation
serves every head and the extra heads cost one (F x C) matmul each. The held-out rows are a
seeded draw over the rows in id order (shard, ordinal), and every batch, held-out pass and
validation pass reads rows in that order too, so the heads do not depend on how many ranks or
workers wrote the store (bit-identical for the same rows). The reported number is the chosen
head's on validation.

Each head's trajectory is independent of the others' (the losses are summed, the parameters are
disjoint, the BatchNorm has none), so with `share` the lrs are spread over the ranks (eval/dist.py
`spread`, rank r trains lrs r, r + N, ...) and the answer is the same as one rank training them all.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..lr_schedule import warmup_cosine
from . import dist as edist
from .feature_store import SplitRows
from .features import Log
from .lars import LARS
from .linear_probe import FAST_PROTOCOL, default_warmup, lars_budget, topk_accuracy
from .rows import RowMap

DEFAULT_BLRS = (0.01, 0.03, 0.1, 0.3, 1.0)


def id_order(rows: SplitRows) -> np.ndarray:
    """Row positions of `rows` sorted by id (shard, ordinal): the same images in the same order
    whichever ranks and workers wrote the store."""
    return np.lexsort((rows.ids[:, 1], rows.ids[:, 0]))


def holdout_split(rows: SplitRows, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit positions, held-out positions) into `rows`, a seeded draw over the rows sorted by id,
    each listed in id order."""
    order = id_order(rows)
    g = torch.Generator().manual_seed(seed + 7919)
    perm = torch.randperm(len(order), generator=g).numpy()
    n_out = int(round(len(order) * fraction)) if fraction > 0 else 0
    n_out = min(n_out, len(order) - 1)
    held = order[np.sort(perm[:n_out])]
    fit = order[np.sort(perm[n_out:])]
    return fit, held


class Heads(nn.Module):
    def __init__(self, dim: int, num_classes: int, n: int, seed: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fcs = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(n))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            w = torch.empty(num_classes, dim)
            nn.init.trunc_normal_(w, std=0.01)
        for fc in self.fcs:  # the same start for every lr: the heads differ only by lr
            with torch.no_grad():
                fc.weight.copy_(w)
                fc.bias.zero_()

    def forward(self, f: torch.Tensor) -> list[torch.Tensor]:
        z = self.bn(f)
        return [fc(z) for fc in self.fcs]


@torch.no_grad()
def _logits(heads: Heads, rows: SplitRows, idx: np.ndarray, rmap: Optional[RowMap], device,
            chunk: int = 8192) -> list[torch.Tensor]:
    heads.eval()
    outs: list[list[torch.Tensor]] = [[] for _ in heads.fcs]
    for a in range(0, len(idx), chunk):
        f = rows.rows(idx[a:a + chunk]).to(device)
        if rmap is not None:
            f = rmap(f)
        for k, lg in enumerate(heads(f)):
            outs[k].append(lg.cpu())
    C = heads.fcs[0].out_features
    return [torch.cat(o) if o else torch.zeros(0, C) for o in outs]


def train_heads(train: SplitRows, val: SplitRows, *, num_classes: int, blrs: Sequence[float] = DEFAULT_BLRS,
                epochs: int = 90, batch_size: int = 256, holdout: float = 0.1, seed: int = 0,
                rmap: Optional[RowMap] = None, device: torch.device | str = "cpu", log: Log = None,
                desc: str = "linear-fast", share: bool = False) -> dict:
    """Train one head per base lr on the fit rows; pick the lr by held-out top-1; report the
    chosen head on `val`. With `holdout` 0 (a set too small to split) the first lr is reported.
    `share`: every rank calls this with the same rows, and the lrs are spread over the ranks."""
    return train_heads_many([(train, val)], num_classes=num_classes, blrs=blrs, epochs=epochs,
                            batch_size=batch_size, holdout=holdout, seed=seed, rmaps=[rmap], device=device,
                            log=log, descs=[desc], share=share)[0]


def train_heads_many(entries: Sequence[tuple[SplitRows, SplitRows]], *, num_classes: int,
                     blrs: Sequence[float] = DEFAULT_BLRS, epochs: int = 90, batch_size: int = 256,
                     holdout: float = 0.1, seed: int = 0, rmaps: Optional[Sequence[Optional[RowMap]]] = None,
                     device: torch.device | str = "cpu", log: Log = None,
                     descs: Optional[Sequence[str]] = None, share: bool = False) -> list[dict]:
    """`train_heads` for several stores of the same images at once (a probe sweep's (k, t)
    entries): one pass over the batches trains every (entry, lr) head, each entry with its own
    normalisation, and each entry's lr is picked on the same held-out rows. Every head sees what it
    would see trained alone (the losses are summed, the parameters are disjoint), so each entry's
    result equals its own `train_heads` run, and `share` (the lrs spread over the ranks, every rank
    calling with the same rows) gives what one rank would."""
    t0 = time.perf_counter()
    rmaps = list(rmaps) if rmaps is not None else [None] * len(entries)
    descs = list(descs) if descs is not None else [f"linear-fast[{i}]" for i in range(len(entries))]
    train0 = entries[0][0]
    for tr, va in entries[1:]:
        if not (np.array_equal(tr.ids, train0.ids) and np.array_equal(va.ids, entries[0][1].ids)):
            raise ValueError("train_heads_many: the stores do not hold the same images in the same order")
    fit, held = holdout_split(train0, holdout, seed)
    M = len(fit)
    bs = max(1, min(batch_size, M))
    steps = max(1, M // bs)
    lrs = [b * bs / 256 for b in blrs]

    def run(ids: list[int]) -> list[list[dict]]:
        """[lr][entry] scores of the heads of lrs `ids`."""
        got = _fit_heads(entries, rmaps, [lrs[i] for i in ids], fit, held, num_classes=num_classes, epochs=epochs,
                         bs=bs, steps=steps, seed=seed, device=torch.device(device), log=log, descs=descs)
        return [list(col) for col in zip(*got)]

    idx = list(range(len(blrs)))
    per_lr = edist.spread(idx, run) if share else run(idx)
    out = []
    for j, ((_tr, va), desc) in enumerate(zip(entries, descs)):
        scores = [per_lr[i][j] for i in idx]
        per_head = [sc["heldout"] for sc in scores] if len(held) else []
        best = int(np.argmax(per_head)) if per_head else 0
        top1, top5 = scores[best]["top1"], scores[best]["top5"]
        if log is not None:
            log(f"{desc}: held-out top-1 by blr " + ", ".join(f"{b:g}: {a:.2f}" for b, a in zip(blrs, per_head))
                + f"; chose blr {blrs[best]:g}, val top-1 {top1:.2f}")
        out.append(dict(protocol=FAST_PROTOCOL, top1=top1, top5=top5, epochs=epochs, feature_dim=scores[0]["dim"],
                        lr=lrs[best], blr=blrs[best], batch_size=bs,
                        heldout_top1=dict(zip(map(float, blrs), per_head)),
                        heldout_images=int(len(held)), train_images=int(M), val_images=int(len(va)),
                        lars_budget=lars_budget(epochs, steps, lrs[best]), num_classes=num_classes))
    seconds = time.perf_counter() - t0  # the one pass's, shared by every entry
    return [dict(r, seconds=seconds) for r in out]


def _fit_heads(entries, rmaps, lrs: list[float], fit: np.ndarray, held: np.ndarray, *, num_classes: int,
               epochs: int, bs: int, steps: int, seed: int, device: torch.device, log: Log,
               descs: list[str]) -> list[list[dict]]:
    """[entry][lr] held-out top-1, val top-1 / top-5 and feature width of one head per lr, trained
    on the batches of `fit` (positions in id order) drawn from `seed`."""
    train0 = entries[0][0]
    M = len(fit)
    dims = [tr.dim if rm is None else int(rm(tr.rows(fit[:1]).to(device)).shape[1])
            for (tr, _), rm in zip(entries, rmaps)]
    if not lrs:
        return [[] for _ in entries]
    heads = [Heads(d, num_classes, len(lrs), seed).to(device) for d in dims]
    opt = LARS([{"params": list(fc.parameters()), "lr": 0.0} for h in heads for fc in h.fcs], momentum=0.9,
               trust_coefficient=0.001)
    warm = default_warmup(epochs)
    y_all = torch.from_numpy(train0.labels)
    gen = torch.Generator().manual_seed(seed)
    losses = [torch.zeros(()) for _ in entries]
    for epoch in range(epochs):
        for h in heads:
            h.train()
        perm = torch.randperm(M, generator=gen).numpy()
        batches = [perm] if M < bs else [perm[i * bs:(i + 1) * bs] for i in range(steps)]
        for step, b in enumerate(batches):
            idx = fit[b]
            y = y_all[idx].to(device)
            for g, lr in zip(opt.param_groups, lrs * len(entries)):
                g["lr"] = warmup_cosine(epoch + step / steps, lr, warm, epochs)
            for j, ((tr, _), rm, h) in enumerate(zip(entries, rmaps, heads)):
                f = tr.rows(idx).to(device)
                if rm is not None:
                    f = rm(f)
                losses[j] = sum(F.cross_entropy(lg, y) for lg in h(f))
            opt.zero_grad(set_to_none=True)
            sum(losses).backward()
            opt.step()
        if log is not None and (epoch + 1 == epochs or (epoch + 1) % max(1, epochs // 4) == 0):
            for desc, loss in zip(descs, losses):
                log(f"{desc}: epoch {epoch + 1}/{epochs}, summed loss of {len(lrs)} heads "
                    f"{float(loss.detach()):.4f}")
    out = []
    for (tr, va), rm, h, dim in zip(entries, rmaps, heads, dims):
        held_top1 = ([topk_accuracy(lg, y_all[held])[0] for lg in _logits(h, tr, held, rm, device)]
                     if len(held) else [float("nan")] * len(lrs))
        vorder = id_order(va)
        y_val = torch.from_numpy(va.labels[vorder])
        val = [topk_accuracy(lg, y_val) for lg in _logits(h, va, vorder, rm, device)]
        out.append([dict(heldout=a, top1=v[0], top5=v[1], dim=dim) for a, v in zip(held_top1, val)])
    return out


__all__ = ["train_heads", "train_heads_many", "holdout_split", "id_order", "DEFAULT_BLRS", "Heads"]
