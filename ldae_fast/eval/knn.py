"""Weighted kNN classifier on L2-normalised features (InstDisc / DINO protocol).

Each validation feature votes with its k most cosine-similar training features; a neighbour with
similarity s adds exp(s / T) to its class (T = 0.07). Top-1 / top-5 from the summed votes.
"""

from __future__ import annotations

import time
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from .features import Log
from .linear_probe import num_classes_of


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    ks: Iterable[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
    chunk: int = 256,
    log: Log = None,
) -> dict[int, dict]:
    """{k: {'top1', 'top5', 'k_used'}} in percent. k larger than the training set is capped
    (reported as k_used) rather than failing, so tiny smoke runs still give a number."""
    t0 = time.perf_counter()
    device = train_feats.device
    C = num_classes or num_classes_of(train_labels, val_labels)
    ytr = train_labels.to(device)
    yva = val_labels.to(device)
    bank = F.normalize(train_feats.float(), dim=1)
    query_all = F.normalize(val_feats.float().to(device), dim=1)
    ks = sorted({int(k) for k in ks})
    used = {k: min(k, bank.shape[0]) for k in ks}
    kmax = max(used.values())
    top5_k = min(5, C)
    hits = {k: torch.zeros(2, device=device) for k in ks}
    # Chunks bound the (chunk, M_train) similarity matrix: ImageNet's bank is 1.28M wide
    # (256 x 1.28M floats = 1.3 GB).
    for start in range(0, query_all.shape[0], chunk):
        q = query_all[start:start + chunk]
        y = yva[start:start + chunk]
        sim, idx = (q @ bank.t()).topk(kmax, dim=1)
        w = (sim / temperature).exp()
        nb = ytr[idx]
        for k in ks:
            kk = used[k]
            votes = torch.zeros(q.shape[0], C, device=device)
            votes.scatter_add_(1, nb[:, :kk], w[:, :kk])
            pred = votes.topk(top5_k, dim=1).indices
            hit = pred == y.view(-1, 1)
            hits[k][0] += hit[:, 0].sum()
            hits[k][1] += hit.any(1).sum()
    n = max(query_all.shape[0], 1)
    out = {}
    for k in ks:
        h = (100.0 * hits[k] / n).tolist()
        out[k] = dict(top1=h[0], top5=h[1], k_used=used[k])
    if log is not None:
        log("knn: " + ", ".join(f"k={k} top-1 {out[k]['top1']:.2f}" for k in ks)
            + f" ({time.perf_counter() - t0:.1f}s)")
    return out
