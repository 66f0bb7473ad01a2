"""The collectives the loop uses across ranks, shared by the multi-rank backends (DDP, DeepSpeed).

A backend that mixes them in sets `world_size` and `device`: the device its process group lives
on, where gloo and NCCL want the tensors they reduce.
"""

from __future__ import annotations

import torch


class RankCollectives:
    world_size: int
    device: torch.device

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def all_gather_object(self, obj):
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        import torch.distributed as dist

        out = t.detach().clone().to(self.device)
        dist.all_reduce(out, op=op)
        return out.to(t.device)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        return self._all_reduce(t, dist.ReduceOp.SUM) / self.world_size

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        return self._all_reduce(t, dist.ReduceOp.MAX)
