"""The single-device backend (`engine.backend=single`, the default): plain autograd + torch.optim.

Its surface (backward / step / state_dict / load_state_dict / save_extra) is every backend's; the
DDP backend (ddp_backend.py) is this one with the model wrapped in DistributedDataParallel.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from .optim import build_optimizer


class SingleDevice:
    """One device, no launcher: plain autograd + torch.optim."""

    world_size = 1
    rank = 0
    is_main = True
    save_on_all_ranks = False

    def __init__(self, cfg: Config, model: torch.nn.Module, lr: float):
        self.cfg = cfg
        # `model` is what the loop calls (a wrapper under DDP); `module` owns the parameters and
        # the state the checkpoint holds.
        self.model = self.module = model
        self.optimizer = build_optimizer(model, cfg, lr)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.engine.grad_accum).backward()

    def step(self, lr: float) -> torch.Tensor:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        params = [p for p in self.module.parameters() if p.grad is not None]
        clip = self.cfg.optim.clip_grad
        # Under DDP the gradients are already the global average, equal on every rank: so is the norm.
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, st: dict, ckpt_dir: Path) -> None:
        self.module.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])

    def save_extra(self, tmp_dir: Path) -> None:
        pass
