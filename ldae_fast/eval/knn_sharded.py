"""kNN with the feature bank sharded across ranks (the bank never needs to fit one device).

Each rank holds its part of the training rows (a feature-store part), L2-normalised after the
row map (eval/rows.py). For a chunk of queries every rank computes its own top-k over its bank in
bank chunks (bounding the (queries x bank chunk) similarity matrix), the ranks all-gather those
(similarity, label) lists, and the merged top-k votes as in knn.py (weight exp(s / T)). The
merge of per-rank top-k lists is the top-k of the union, so N ranks give one rank's answer up
to ties between equal similarities.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
import torch.nn.functional as F

from . import dist as edist
from .feature_store import SplitRows
from .features import Log
from .rows import RowMap


def _normalised(rows: SplitRows, rmap: RowMap, device, dtype, chunk: int = 65536) -> torch.Tensor:
    n = len(rows)
    out = []
    for a in range(0, n, chunk):
        x = rows.rows(torch.arange(a, min(n, a + chunk)).numpy()).to(device)
        out.append(F.normalize(rmap(x), dim=1).to(dtype))
    return torch.cat(out) if out else torch.zeros(0, 0, device=device, dtype=dtype)


@torch.no_grad()
def knn_sharded(bank_rows: SplitRows, query_rows: SplitRows, rmap: RowMap, *, num_classes: int,
                ks: Iterable[int] = (20, 200), temperature: float = 0.07, query_chunk: int = 1024,
                bank_chunk: int = 262144, device: torch.device | str = "cpu",
                log: Log = None) -> dict[int, dict]:
    """{k: {'top1', 'top5', 'k_used'}}: `bank_rows` are this rank's training rows, `query_rows`
    every validation row (the same on every rank)."""
    t0 = time.perf_counter()
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    bank = _normalised(bank_rows, rmap, device, dtype)
    ybank = torch.from_numpy(bank_rows.labels).to(device)
    queries = _normalised(query_rows, rmap, device, dtype)
    yq = torch.from_numpy(query_rows.labels).to(device)
    n_bank = torch.tensor([float(len(bank_rows))], dtype=torch.float64)
    edist.all_sum(n_bank)
    ks = sorted({int(k) for k in ks})
    used = {k: int(min(k, n_bank.item())) for k in ks}
    kmax = max(used.values())
    C = num_classes
    top5_k = min(5, C)
    hits = {k: torch.zeros(2, dtype=torch.float64) for k in ks}
    for a in range(0, queries.shape[0], query_chunk):
        q = queries[a:a + query_chunk]
        best_s = torch.full((q.shape[0], 0), -2.0, device=device)
        best_y = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=device)
        for b in range(0, bank.shape[0], bank_chunk):
            sim = (q @ bank[b:b + bank_chunk].t()).float()
            kk = min(kmax, sim.shape[1])
            s, i = sim.topk(kk, dim=1)
            best_s, order = torch.cat([best_s, s], 1).topk(min(kmax, best_s.shape[1] + kk), dim=1)
            best_y = torch.cat([best_y, ybank[b:b + bank_chunk][i]], 1).gather(1, order)
        # Pad to kmax so every rank contributes a same-shape list (a small part may hold < kmax).
        pad = kmax - best_s.shape[1]
        if pad > 0:
            best_s = torch.cat([best_s, torch.full((q.shape[0], pad), -2.0, device=device)], 1)
            best_y = torch.cat([best_y, torch.zeros((q.shape[0], pad), dtype=torch.int64, device=device)], 1)
        all_s = torch.cat(edist.all_gather_same(best_s.cpu()), 1)
        all_y = torch.cat(edist.all_gather_same(best_y.cpu()), 1)
        s, order = all_s.topk(kmax, dim=1)
        y_nb = all_y.gather(1, order)
        w = (s / temperature).exp()
        yy = yq[a:a + query_chunk].cpu()
        for k in ks:
            kk = used[k]
            votes = torch.zeros(q.shape[0], C, dtype=torch.float32)
            votes.scatter_add_(1, y_nb[:, :kk], w[:, :kk])
            pred = votes.topk(top5_k, dim=1).indices
            hit = pred == yy.view(-1, 1)
            hits[k] += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item()], dtype=torch.float64)
    n = max(queries.shape[0], 1)
    out = {k: dict(top1=100.0 * float(hits[k][0]) / n, top5=100.0 * float(hits[k][1]) / n, k_used=used[k])
           for k in ks}
    if log is not None:
        log(f"knn ({rmap.kind}): " + ", ".join(f"k={k} top-1 {out[k]['top1']:.2f}" for k in ks)
            + f" ({time.perf_counter() - t0:.1f}s)")
    return out


__all__ = ["knn_sharded"]
