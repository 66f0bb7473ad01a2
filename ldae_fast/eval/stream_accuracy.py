"""Top-1 / top-5 accuracy over a validation stream split across ranks (the streaming probe's and
fine-tune's evaluation): hits counted per rank in float64, summed once at the end."""

from __future__ import annotations

from typing import Callable

import torch

from . import dist as edist
from .stream import EvalStream


@torch.no_grad()
def stream_topk(val: EvalStream, chunk: int, logits_of: Callable[[torch.Tensor], torch.Tensor]
                ) -> tuple[float, float, int]:
    """(top-1, top-5, samples) of `logits_of(images)` (a uint8 batch of at most `chunk`) on the
    stream, over all ranks; top-5 is top-k for fewer than 5 classes."""
    hits = torch.zeros(3, dtype=torch.float64)
    for x, y, _ids in val.once(chunk=chunk):
        logits = logits_of(x)
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices.cpu() == y.view(-1, 1)
        hits += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), y.numel()], dtype=torch.float64)
    edist.all_sum(hits)
    n = max(int(hits[2]), 1)
    return 100.0 * float(hits[0]) / n, 100.0 * float(hits[1]) / n, int(hits[2])


__all__ = ["stream_topk"]
