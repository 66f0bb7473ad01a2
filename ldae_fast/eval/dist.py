"""Data-parallel evaluation: the process group from torchrun's environment, and the few
collectives the protocols use (each a no-op on one process)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(device: torch.device, *, timeout_min: float) -> Ranks:
    """Join torchrun's group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA); one process otherwise.
    `timeout_min`: how long a collective may wait for the slowest rank before the run is stopped
    (NCCL's watchdog default, 10 minutes, is shorter than some of the protocols' uneven work)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min))
    return Ranks(dist.get_rank(), dist.get_world_size())


def current() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def _comm(t: torch.Tensor) -> torch.Tensor:
    """t where the backend can reduce it: NCCL takes CUDA tensors only (host-side counts and
    statistics travel through the current GPU)."""
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place, returned (any device; callers pass float64 where order matters)."""
    if current().distributed:
        c = _comm(t)
        dist.all_reduce(c)
        if c is not t:
            t.copy_(c)
    return t


def all_gather_same(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor of the same shape, rank order, on t's device."""
    r = current()
    if not r.distributed:
        return [t]
    c = _comm(t.contiguous())
    parts = [torch.zeros_like(c) for _ in range(r.world_size)]
    dist.all_gather(parts, c)
    return [p.to(t.device) for p in parts]


def all_gather_objects(obj: Any) -> list[Any]:
    r = current()
    if not r.distributed:
        return [obj]
    out: list[Any] = [None] * r.world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's rows (any count per rank), rank order."""
    r = current()
    if not r.distributed:
        return t
    ns = all_gather_same(torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device))
    m = int(max(int(x) for x in ns))
    pad = torch.zeros((m,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    pad[: t.shape[0]] = t
    parts = all_gather_same(pad)
    return torch.cat([p[: int(k)] for p, k in zip(parts, ns)])


def spread(items: list, fn: Callable[[list], list]) -> list:
    """fn over `items` shared out by rank (rank r takes items r, r + N, ...), every rank given all
    the results in item order. For independent work, such as one probe head set per store: fn's
    answer for an item must not depend on which other items it was given."""
    r = current()
    mine = fn(items[r.rank::r.world_size]) if items[r.rank::r.world_size] else []
    out: list = [None] * len(items)
    for rank, got in enumerate(all_gather_objects(mine)):
        out[rank::r.world_size] = got
    return out


def barrier() -> None:
    if current().distributed:
        dist.barrier()


__all__ = ["Ranks", "init_from_env", "current", "all_sum", "all_gather_same", "all_gather_objects", "all_gather_rows",
           "barrier", "spread"]
