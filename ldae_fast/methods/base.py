"""The method seam: what the engine, eval and bench may ask of a method (DESIGN.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..batch import Batch
from ..kernels.dispatch import resolve_kernels


def place(method: Any, cfg: Any, device: torch.device | str, rank: int, world_size: int,
          kernels: str | None) -> None:
    """The setup every method object starts with: its run config, patch size and rank layout, its
    device, and its kernel mode (`kernels`, else engine.kernels) resolved once for that device
    (`method.kernels`: 'triton' or 'reference'); `method._mode` keeps the mode, so `to()` can
    rebuild the method for another device."""
    method.cfg, method.p = cfg, cfg.model.patch_size
    method.rank, method.world_size = rank, world_size
    method.device = torch.device(device)
    method._mode = cfg.engine.kernels if kernels is None else kernels
    method.kernels = resolve_kernels(method._mode, method.device)


@runtime_checkable
class Method(Protocol):
    name: str
    kernels: str
    """'triton' or 'reference': what the method's kernels resolved to on its device."""

    def prepare(self, images: Callable[[], Iterable[torch.Tensor]], *, rank: int = 0,
                broadcast: Callable[[Any], Any] | None = None, log: Callable[[str], None] = print,
                state: dict | None = None) -> None:
        """Make the method ready to train: from `state` (a resumed checkpoint's) when given, else
        fit or load what it needs on rank 0 from `images()` and `broadcast` it to the others."""

    def __call__(self, model: torch.nn.Module, batch: Batch, step: int, micro: int = 0, accum: int = 1,
                 *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The loss of one micro-batch: `micro` of `accum` of optimizer step `step`."""

    def sample(self, model: torch.nn.Module, images: torch.Tensor, sigmas, *, step: int = 0
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For figures: per noise level, (what the network saw, what it returned)."""

    def to(self, device) -> Method:
        """The same method (state included) for another device."""

    def state_dict(self) -> dict:
        """Tensors and JSON-able values only: nested in the checkpoint under 'method'."""

    def load_state_dict(self, state: dict) -> None:
        ...

    def export(self, out_dir: Path) -> None:
        """Write the files a user may reuse on their own (a fitted tokenizer)."""
