"""MAE as a method: hide a random 75% of each image's patches (keyed like every draw), encode the
rest, predict the hidden patches' pixels; the loss is their mean squared error, optionally on
per-patch normalised pixels (mae.norm_pix_loss)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...batch import Batch
from ...device import eval_mode
from ...errors import ResumeMismatch
from ...markers import nvtx_range
from ...reference import patchify, unpatchify
from ...seeding import global_rows
from .. import masking
from ..base import place
from ..masking import NORM_PIX_EPS, PatchMask, masked_mse, normalize_patches


class MAEMethod:
    """Owns the mask draws and the loss; nothing to fit, no noise."""

    name = "mae"

    def __init__(self, cfg, device: torch.device | str, rank: int = 0, world_size: int = 1,
                 tokenizer=None, kernels: str | None = None):
        if tokenizer is not None:
            raise ValueError("objective.method='mae' works on pixels and takes no tokenizer")
        place(self, cfg, device, rank, world_size, kernels)
        self.obj = cfg.mae

    # seam -----------------------------------------------------------------------------------
    def prepare(self, images: Callable[[], Iterable[torch.Tensor]], *, rank: int = 0,
                broadcast: Callable[[Any], Any] | None = None, log: Callable[[str], None] = print,
                state: dict | None = None) -> None:
        if state is not None:
            self.load_state_dict(state)

    def to(self, device: torch.device | str) -> MAEMethod:
        return MAEMethod(self.cfg, device, self.rank, self.world_size, kernels=self._mode)

    def state_dict(self) -> dict:
        return {"mask_ratio": float(self.obj.mask_ratio), "norm_pix_loss": bool(self.obj.norm_pix_loss)}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint of another masking or target would resume a different run: refused."""
        mine = self.state_dict()
        for key in mine:
            if key in state and state[key] != mine[key]:
                raise ResumeMismatch(f"the checkpoint's MAE {key} {state[key]} differs from the config's "
                                     f"{mine[key]} (mae.{key}); resume with the checkpoint's values")

    def export(self, out_dir: Path) -> None:
        """Nothing to write: MAE keeps no fitted state beside the network."""

    # loss -----------------------------------------------------------------------------------
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder predicts: patchify(x) (B, N, D), per-patch normalised with
        mae.norm_pix_loss."""
        t = patchify(x.float(), self.p)
        return normalize_patches(t) if self.obj.norm_pix_loss else t

    def draw_mask(self, batch: int, num_patches: int, step: int, micro: int, accum: int) -> PatchMask:
        """This micro-batch's rows of step `step`'s global-batch masks: micro-batch m of `accum` on
        rank r holds rows (m * world + r) * B .. + B - 1, so N ranks draw what one process draws."""
        row, gb = global_rows(batch, micro, accum, self.rank, self.world_size)
        return masking.random_masking(batch, num_patches, self.obj.mask_ratio, seed=self.cfg.engine.seed,
                                      step=step, row=row, global_batch=gb, device=self.device)

    def __call__(self, model: torch.nn.Module, batch: Batch, step: int, micro: int = 0, accum: int = 1,
                 *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        x = batch.images
        with nvtx_range("noise"), torch.no_grad():
            target = self.target(x)
            mk = self.draw_mask(x.shape[0], target.shape[1], step, micro, accum)
        if autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=autocast_dtype):
                pred = model(x, ids_keep=mk.ids_keep)
        else:
            pred = model(x, ids_keep=mk.ids_keep)
        with nvtx_range("loss"):
            return masked_mse(pred, target, mk.mask)

    # figures --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model: torch.nn.Module, images: torch.Tensor, sigmas: Sequence[float] = (), *,
               step: int = 0, mask: str = "random") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(masked input, reconstruction)]: hidden patches at the dataset mean (0), then the
        visible patches kept and the hidden ones predicted (un-normalised with each patch's own
        statistics when norm_pix_loss, as MAE's figures do)."""
        x = images.to(self.device).float()
        B, C, H, W = x.shape
        g = W // self.p
        if mask == "center":
            mk = masking.center_block_mask(B, H // self.p, g, device=self.device)
        else:
            mk = self.draw_mask(B, (H // self.p) * g, step, 0, 1)
        raw = patchify(x, self.p)
        with eval_mode(model):
            pred = model(x, ids_keep=mk.ids_keep).float()
        if self.obj.norm_pix_loss:
            mu, var = raw.mean(-1, keepdim=True), raw.var(-1, keepdim=True)
            pred = pred * (var + NORM_PIX_EPS).sqrt() + mu
        hidden = mk.mask.unsqueeze(-1)
        masked = unpatchify(raw * ~hidden, self.p, H, W, C)
        recon = unpatchify(torch.where(hidden, pred, raw), self.p, H, W, C)
        return [(masked, recon)]
