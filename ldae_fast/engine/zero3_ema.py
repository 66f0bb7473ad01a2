"""The parameter EMA under DeepSpeed ZeRO-3, kept sharded like the weights it averages.

Under ZeRO-3 a rank holds, per parameter, one contiguous partition of its flattened fp32 master
(partition r covers elements [r P, (r + 1) P), the last one zero-padded). The EMA keeps the same
partition of the average, updated from the fp32 master partition after each optimizer step: no
communication and 1/R of the memory. A checkpoint gathers the partitions once into the full
averaged weights, so state.pt's "ema" is the same dict as on one device (eval and export read it
unchanged); a resume cuts each rank's partition back out of it.
"""

from __future__ import annotations

import torch

from .optim import EMA


def _local_fp32(p: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_local_fp32_param

    t = safe_get_local_fp32_param(p)
    if t is None:
        raise RuntimeError("ZeRO-3 EMA: a parameter has no local fp32 partition (no ZeRO-3 optimizer?)")
    return t.detach().reshape(-1)


class ShardedEMA(EMA):
    """EMA's decay rule and surface; `shadow` holds this rank's partition of each parameter (and
    the whole of each buffer, which ZeRO-3 does not partition)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        import torch.distributed as dist

        self.decay = decay
        self.updates = 0
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.params = dict(model.named_parameters())
        self.shape = {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in self.params.items()}
        self.shadow = {}
        for k, v in model.state_dict().items():
            if k in self.params and self.params[k].dtype.is_floating_point:
                self.shadow[k] = _local_fp32(self.params[k]).clone().float()
            else:
                self.shadow[k] = v.detach().clone()

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        avg_s, avg_v = [], []
        for k, s in self.shadow.items():
            if k in self.params:
                avg_s.append(s)
                avg_v.append(_local_fp32(self.params[k]).float())
        if avg_s:
            torch._foreach_lerp_(avg_s, avg_v, 1.0 - decay)
        buffers = dict(model.named_buffers())
        for k, s in self.shadow.items():
            if k in buffers:
                s.copy_(buffers[k])

    def checkpoint_state(self) -> dict[str, torch.Tensor] | None:
        """Collective: the full averaged weights on rank 0 (None on the others)."""
        import torch.distributed as dist

        mine = {k: v.cpu() for k, v in self.shadow.items() if k in self.params}
        parts: list | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if self.rank != 0:
            return None
        full = {}
        for k, v in self.shadow.items():
            if k in self.params:
                n = int(torch.Size(self.shape[k]).numel())
                full[k] = torch.cat([p[k] for p in parts])[:n].view(self.shape[k]).clone()
            else:
                full[k] = v.detach().cpu().clone()
        return full

    def load_state_dict(self, sd: dict[str, torch.Tensor], updates: int = 0) -> None:
        for k, v in sd.items():
            s = self.shadow[k]
            if k not in self.params:
                s.copy_(v)
                continue
            flat = v.reshape(-1).to(s)
            lo = self.rank * -(-flat.numel() // self.world)  # partition size: ceil(numel / ranks)
            piece = flat[lo:lo + s.numel()]
            s.zero_()
            s[:piece.numel()].copy_(piece)
        self.updates = updates


__all__ = ["ShardedEMA"]
