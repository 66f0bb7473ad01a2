"""The unit a data stream hands to a method: images plus whatever travels with them."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Batch:
    images: torch.Tensor
    """(B, C, H, W) normalised images."""
    labels: torch.Tensor | None = None
    """(B,) int64 class indices, when the data has them."""
    masks: torch.Tensor | None = None
    """(B, N) bool patch masks, for methods that draw or read them (DiffMAE)."""

    @classmethod
    def of(cls, item) -> Batch:
        """A Batch from what a stream yields: a Batch, an (images, labels) pair or bare images."""
        if isinstance(item, Batch):
            return item
        if isinstance(item, torch.Tensor):
            return cls(item)
        images, labels = item
        return cls(images, labels if isinstance(labels, torch.Tensor) else None)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device, non_blocking: bool = False) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in moved.items() if v is not None}
        return replace(self, **moved)
