"""Feature-row transforms fitted on the training rows: raw, centred, whitened, PCA to a width.

Pooled ViT features are strongly anisotropic (a few directions carry most of the variance), so
cosine kNN on raw rows mostly measures those directions; centring removes the common offset and
whitening (PCA, each direction scaled to unit variance) gives every direction equal say. The
statistics are sums over every rank's training rows (float64), so every rank applies the same map;
`fit_tensor` fits the same maps on one process's rows in memory (no collectives: a caller that
evaluates on one rank of a group must not wait on the others).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import dist as edist
from .feature_store import SplitRows

ROW_KINDS = ("raw", "centred", "whitened")


@dataclass
class RowMap:
    kind: str
    mean: Optional[torch.Tensor] = None  # (F,)
    proj: Optional[torch.Tensor] = None  # (F, F') applied after centring

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "raw":
            return x
        x = x - self.mean.to(x.device, x.dtype)
        return x if self.proj is None else x @ self.proj.to(x.device, x.dtype)


def _moments(rows: SplitRows, across_ranks: bool = True,
             chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum, sum of outer products, count) over this rank's rows, all ranks summed (unless not
    `across_ranks`), float64."""
    F = rows.dim
    n = len(rows)
    head = torch.tensor([float(n), float(F)], dtype=torch.float64)
    s = torch.zeros(F, dtype=torch.float64)
    ss = torch.zeros(F, F, dtype=torch.float64)
    for a in range(0, n, chunk):
        x = rows.rows(torch.arange(a, min(n, a + chunk)).numpy()).double()
        s += x.sum(0)
        ss += x.t() @ x
    if across_ranks:
        edist.all_sum(head)
        edist.all_sum(s)
        edist.all_sum(ss)
    return s, ss, int(head[0])


def _spectrum(rows: SplitRows, across_ranks: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, variances descending, directions as columns) of every rank's rows. Fewer rows than
    dimensions (small sets, raw pixels): the SVD of the gathered rows, cheaper than the (F, F)
    eigendecomposition and the same directions where there is any variance."""
    s, ss, n = _moments(rows, across_ranks)
    mean = s / max(n, 1)
    if n < rows.dim:
        x = rows.rows(torch.arange(len(rows)).numpy()).double()
        x = (edist.all_gather_rows(x) if across_ranks else x) - mean
        _, sv, vh = torch.linalg.svd(x, full_matrices=False)
        return mean, sv ** 2 / max(n, 1), vh.t()
    cov = ss / max(n, 1) - torch.outer(mean, mean)
    evals, evecs = torch.linalg.eigh(cov)
    return mean, evals.flip(0).clamp_min(0), evecs.flip(1)


def fit_rows(rows: SplitRows, kind: str, width: int = 0, eps: float = 1e-6,
             cache: Optional[dict] = None, across_ranks: bool = True) -> RowMap:
    """The map of `kind` ('raw', 'centred', 'whitened', or 'pca' to `width` directions); `cache`
    keeps the spectrum between calls on the same rows."""
    if kind == "raw":
        return RowMap("raw")
    if cache is not None and "spectrum" in cache:
        mean, evals, evecs = cache["spectrum"]
    else:
        mean, evals, evecs = _spectrum(rows, across_ranks)
        if cache is not None:
            cache["spectrum"] = (mean, evals, evecs)
    if kind == "centred":
        return RowMap("centred", mean.float())
    if kind == "whitened":
        # eps relative to the largest variance: directions with no variance stay ~0, not huge.
        scale = 1.0 / torch.sqrt(evals + eps * float(evals[0].clamp_min(1e-30)))
        return RowMap("whitened", mean.float(), (evecs * scale).float())
    if kind == "pca":
        k = max(1, min(width, evecs.shape[1]))
        return RowMap(f"pca {k}", mean.float(), evecs[:, :k].float())
    raise ValueError(f"row transform {kind!r}: choose {', '.join(ROW_KINDS)} or 'pca'")


def fit_tensor(train: torch.Tensor, kind: str, width: int = 0, eps: float = 1e-6,
               cache: Optional[dict] = None) -> RowMap:
    """fit_rows on training rows held in memory, (n, F), by this process alone. Fit it on the
    training rows only and apply it to train and val alike: a statistic of val would leak it."""
    x = train.detach().float().cpu().numpy()
    rows = SplitRows([x], np.zeros(len(x), dtype=np.int64), np.zeros((len(x), 2), dtype=np.int64), "fp32",
                     int(train.shape[1]))
    return fit_rows(rows, kind, width, eps, cache, across_ranks=False)


def pca_rows(train: torch.Tensor, width: int) -> RowMap:
    """The train mean and its top `width` principal directions, of rows held in memory (the in-RAM
    protocols' pixel-PCA floor)."""
    return fit_tensor(train, "pca", width)


__all__ = ["RowMap", "fit_rows", "fit_tensor", "pca_rows", "ROW_KINDS"]
