"""torch DistributedDataParallel backend (`engine.backend=ddp`, launched by torchrun).

Every rank keeps the whole model and optimizer state; gradients are averaged in buckets that
overlap the backward pass. For models that fit on one GPU (the ViT-B .. ViT-L of the papers,
0.1-0.9B parameters) this is the cheapest multi-GPU step: ZeRO's partitioning saves memory
that such a model does not need and costs extra collectives. This is engine.single_device's backend
with the model wrapped, and so is the checkpoint (full model and optimizer state in state.pt,
written by rank 0), so a run moves between one device and DDP without conversion.

Gradient accumulation: the loop runs every micro-batch but the last inside `micro_step(last=False)`,
DDP's `no_sync`, so gradients are all-reduced once per optimizer step, not once per micro-batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

import torch

from ..config import Config
from .collectives import RankCollectives
from .single_device import SingleDevice


def init_process_group(on_cuda: bool) -> None:
    """torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), or a one-rank world without it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
    # Generous: the first step of a compiled model, or rank 0 fitting the tokenizer while the
    # others wait in its broadcast, can take many minutes.
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=datetime.timedelta(minutes=60))


class DDPBackend(RankCollectives, SingleDevice):
    """SingleDevice's step and checkpoint on a DistributedDataParallel model, plus the collectives
    the loop uses across ranks."""

    save_on_all_ranks = True  # the save gathers every rank's data position: collective

    def __init__(self, cfg: Config, model: torch.nn.Module, lr: float):
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        on_cuda = next(model.parameters()).is_cuda
        init_process_group(on_cuda)
        super().__init__(cfg, model, lr)
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0
        self.device = next(model.parameters()).device
        # DDP broadcasts rank 0's parameters and buffers here, so every rank starts equal.
        self.model = DistributedDataParallel(
            model, device_ids=[self.device.index] if on_cuda else None,
            # Each micro-batch uses every parameter: no search for unused ones (it costs a pass).
            find_unused_parameters=False, gradient_as_bucket_view=True)

    def micro_step(self, last: bool):
        """Context of one micro-batch's forward and backward: no all-reduce unless `last`."""
        return contextlib.nullcontext() if last else self.model.no_sync()

    def load_state_dict(self, st: dict, ckpt_dir: Path) -> None:
        if st.get("model") is None or st.get("optimizer") is None:
            raise FileNotFoundError(f"{ckpt_dir} holds no full model and optimizer state (a DeepSpeed ZeRO "
                                    "checkpoint?); resume it with --engine.backend=deepspeed")
        super().load_state_dict(st, ckpt_dir)
