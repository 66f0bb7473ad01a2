"""The fast probe from a feature store: several heads (one per base lr) in one pass over the rows,
the lr picked on a held-out part of the training split, never on the validation split.

Each head is the MAE probe head (BatchNorm without affine, then a linear layer, LARS, warm-up +
cosine), trained on the same batches: the BatchNorm has no parameters, so one normalisation
serves every head and the extra heads cost one (F x C) matmul each. The held-out rows are a
seeded draw over the rows in id order (shard, ordinal), so the split does not depend on how many
ranks wrote the store. The reported number is the chosen head's on validation.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..lr_schedule import warmup_cosine
from .feature_store import SplitRows
from .features import Log
from .lars import LARS
from .linear_probe import FAST_PROTOCOL, default_warmup, lars_budget, topk_accuracy
from .rows import RowMap

DEFAULT_BLRS = (0.01, 0.03, 0.1, 0.3, 1.0)


def holdout_split(rows: SplitRows, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices) into `rows`, drawn over the rows sorted by id."""
    order = np.lexsort((rows.ids[:, 1], rows.ids[:, 0]))
    g = torch.Generator().manual_seed(seed + 7919)
    perm = torch.randperm(len(order), generator=g).numpy()
    n_out = int(round(len(order) * fraction)) if fraction > 0 else 0
    n_out = min(n_out, len(order) - 1)
    held = np.sort(order[perm[:n_out]])
    fit = np.sort(order[perm[n_out:]])
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
                desc: str = "linear-fast") -> dict:
    """Train one head per base lr on the fit rows; pick the lr by held-out top-1; report the
    chosen head on `val`. With `holdout` 0 (a set too small to split) the first lr is reported."""
    return train_heads_many([(train, val)], num_classes=num_classes, blrs=blrs, epochs=epochs,
                            batch_size=batch_size, holdout=holdout, seed=seed, rmaps=[rmap], device=device,
                            log=log, descs=[desc])[0]


def train_heads_many(entries: Sequence[tuple[SplitRows, SplitRows]], *, num_classes: int,
                     blrs: Sequence[float] = DEFAULT_BLRS, epochs: int = 90, batch_size: int = 256,
                     holdout: float = 0.1, seed: int = 0, rmaps: Optional[Sequence[Optional[RowMap]]] = None,
                     device: torch.device | str = "cpu", log: Log = None,
                     descs: Optional[Sequence[str]] = None) -> list[dict]:
    """`train_heads` for several stores of the same images at once (a probe sweep's (k, t)
    entries): one pass over the batches trains every (entry, lr) head, each entry with its own
    normalisation, and each entry's lr is picked on the same held-out rows. Every head sees what it
    would see trained alone (the losses are summed, the parameters are disjoint), so each entry's
    result equals its own `train_heads` run."""
    t0 = time.perf_counter()
    device = torch.device(device)
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
    dims = [tr.dim if rm is None else int(rm(tr.rows(fit[:1]).to(device)).shape[1])
            for (tr, _), rm in zip(entries, rmaps)]
    heads = [Heads(d, num_classes, len(blrs), seed).to(device) for d in dims]
    lrs = [b * bs / 256 for b in blrs]
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
                log(f"{desc}: epoch {epoch + 1}/{epochs}, summed loss of {len(blrs)} heads "
                    f"{float(loss.detach()):.4f}")
    out = []
    for (tr, va), rm, h, dim, desc in zip(entries, rmaps, heads, dims, descs):
        per_head = []
        if len(held):
            y_held = y_all[held]
            for lg in _logits(h, tr, held, rm, device):
                per_head.append(topk_accuracy(lg, y_held)[0])
            best = int(np.argmax(per_head))
        else:
            best = 0
        lg = _logits(h, va, np.arange(len(va)), rm, device)[best]
        top1, top5 = topk_accuracy(lg, torch.from_numpy(va.labels))
        if log is not None:
            log(f"{desc}: held-out top-1 by blr " + ", ".join(f"{b:g}: {a:.2f}" for b, a in zip(blrs, per_head))
                + f"; chose blr {blrs[best]:g}, val top-1 {top1:.2f}")
        out.append(dict(protocol=FAST_PROTOCOL, top1=top1, top5=top5, epochs=epochs, feature_dim=dim,
                        lr=lrs[best], blr=blrs[best], batch_size=bs,
                        heldout_top1=dict(zip(map(float, blrs), per_head)),
                        heldout_images=int(len(held)), train_images=int(M), val_images=int(len(va)),
                        lars_budget=lars_budget(epochs, steps, lrs[best]), num_classes=num_classes))
    seconds = time.perf_counter() - t0  # the one pass's, shared by every entry
    return [dict(r, seconds=seconds) for r in out]


__all__ = ["train_heads", "train_heads_many", "holdout_split", "DEFAULT_BLRS", "Heads"]
