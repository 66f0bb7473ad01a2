"""Where a rank's batch lies in the epoch permutations, and how that survives another run shape.

The indexed sources (synthetic, resident) visit, in epoch e, a permutation of their N items keyed
on (seed, e), the same on every rank. With R ranks and micro-batch b, the global micro-batch g of
an epoch covers permutation positions [g b, (g + 1) b) and rank r takes g = j R + r for its j-th
batch; the tail of fewer than R b items is dropped. So after j batches of every rank the epoch's
first j R b positions are consumed, a prefix, whatever R and b: the position is (epoch, samples
consumed), and a run resumed with R' ranks and micro-batch b' splits the rest of that epoch,
none twice, none skipped (`origin`). With the global batch unchanged, each sample even lands on the
same row of the same step's global batch (rows are (micro x R + rank) x b + i), where the
objective's keyed noise draws for it the same as before.
"""

from __future__ import annotations

from typing import Any


class Placement:
    """Batch j (0, 1, ... across epochs) of rank `rank`: (epoch, first permutation position)."""

    def __init__(self, num_items: int, batch_size: int, world_size: int, rank: int) -> None:
        self.n, self.b, self.world, self.rank = num_items, batch_size, world_size, rank
        self.per_epoch = num_items // (batch_size * world_size)
        # (j0, epoch0, offset0): batch j0 starts at position offset0 of epoch0, the rest of which is
        # split over this run's ranks; later epochs are whole. (0, 0, 0) for a run that never moved.
        self.origin = (0, 0, 0)

    def _first_epoch_batches(self) -> int:
        return (self.n - self.origin[2]) // (self.b * self.world)

    def locate(self, j: int, rank: int | None = None) -> tuple[int, int]:
        """(epoch, first permutation position) of batch j of `rank` (this one by default)."""
        r = self.rank if rank is None else rank
        j0, e0, off = self.origin
        k, k0 = j - j0, self._first_epoch_batches()
        if k < k0:
            return e0, off + (k * self.world + r) * self.b
        e, i = divmod(k - k0, self.per_epoch)
        return e0 + 1 + e, (i * self.world + r) * self.b

    def consumed(self, j: int) -> tuple[int, int]:
        """(epoch, positions of it consumed) once every rank has handed out j batches."""
        j0, e0, off = self.origin
        k, k0 = j - j0, self._first_epoch_batches()
        if k < k0:
            return e0, off + k * self.world * self.b
        e, i = divmod(k - k0, self.per_epoch)
        return e0 + 1 + e, i * self.world * self.b

    def epoch(self, j: int) -> int:
        return self.consumed(j)[0]

    def state_dict(self, j: int) -> dict[str, Any]:
        epoch, used = self.consumed(j)
        return {"epoch": epoch, "consumed": used, "origin": list(self.origin), "batch_size": self.b,
                "world_size": self.world, "num_items": self.n,
                # the format before `consumed`: still read by older code
                "batch": used // (self.b * self.world)}

    def load_state_dict(self, sd: dict[str, Any]) -> tuple[int, bool]:
        """Take a saved position; returns (batches to continue from, whether the shape moved)."""
        b0 = int(sd.get("batch_size", self.b))
        w0 = int(sd.get("world_size", self.world))
        epoch = int(sd["epoch"])
        used = int(sd["consumed"]) if "consumed" in sd else int(sd["batch"]) * b0 * w0
        if (b0, w0) == (self.b, self.world):
            if "origin" in sd:
                self.origin = tuple(int(v) for v in sd["origin"])  # type: ignore[assignment]
                return int(sd["batches"]), False
            return epoch * self.per_epoch + min(int(sd["batch"]), self.per_epoch), False
        # Another shape: this run's batch 0 starts where the old ranks stopped.
        self.origin = (0, epoch, min(used, self.n))
        return 0, True


__all__ = ["Placement"]
