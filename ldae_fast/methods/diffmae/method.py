"""DiffMAE as a method: mask, noise the masked patches, predict their clean pixels; inpaint by
reverse diffusion.

Training step (DESIGN.md, "DiffMAE"): per sample, hide mask_ratio of the patches (MAE's random
masking); draw t uniformly from {0, ..., T-1} and noise the hidden patches,
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with DDPM's linear betas raised to rho; the
encoder sees the visible patches, the decoder the noised hidden ones and t, and predicts their
clean pixels. The loss is the mean squared error over the hidden patches only.

Every draw (masks, t, eps) is keyed on (engine.seed, step, row of the step's global batch), as
in l-DAE: a resumed run and N ranks draw what one uninterrupted process draws.

Clips (B, C, T, H, W): the patches are the spacetime tubelets (diffmae.tubelet x p x p, numbered
time-major), masked by the same random masking at diffmae.mask_ratio; the encoder sees the
visible tubelets whole, while the target and the decoder's noisy input are one time slice of
each tubelet, frame diffmae.time_slice of it (frames time_slice, time_slice + tubelet, ...):
every "patch" below is then that p x p slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...batch import Batch
from ...config import Config
from ...device import eval_mode
from ...errors import ResumeMismatch
from ...markers import nvtx_range
from ...reference import patchify, unpatchify
from ...seeding import TAG_NOISE, TAG_NOISE_LEVEL, TAG_SAMPLE, derive_seed, global_rows
from .. import masking
from ..base import place
from ..masking import (
    NORM_PIX_EPS,
    PatchMask,
    gather_tokens,
    masked_mse,
    normalize_patches,
    scatter_tokens,
)
from .schedules import DiffusionSchedule


class DiffMAEMethod:
    """Owns the mask draws, the schedule, the loss and the inpainting sampler; nothing to fit."""

    name = "diffmae"

    def __init__(self, cfg: Config, device: torch.device | str, rank: int = 0, world_size: int = 1,
                 tokenizer=None, kernels: str | None = None):
        if tokenizer is not None:
            raise ValueError("objective.method='diffmae' works on pixels and takes no tokenizer")
        # DiffMAE runs no Triton kernel of its own; resolving the mode keeps `kernels` honest in the log.
        place(self, cfg, device, rank, world_size, kernels)
        self.obj = cfg.diffmae
        self.schedule = DiffusionSchedule.ddpm(self.obj.num_timesteps, self.obj.rho)
        self.tubelet, self.time_slice = cfg.diffmae.tubelet, self.obj.time_slice
        self.video = cfg.data.num_frames > 0

    # seam -----------------------------------------------------------------------------------
    def prepare(self, images: Callable[[], Iterable[torch.Tensor]], *, rank: int = 0,
                broadcast: Callable[[Any], Any] | None = None, log: Callable[[str], None] = print,
                state: dict | None = None) -> None:
        if state is not None:
            self.load_state_dict(state)

    def to(self, device: torch.device | str) -> DiffMAEMethod:
        return DiffMAEMethod(self.cfg, device, self.rank, self.world_size, kernels=self._mode)

    def state_dict(self) -> dict:
        sd = {"schedule": {"num_timesteps": self.schedule.num_timesteps, "rho": float(self.obj.rho)},
              "mask_ratio": float(self.obj.mask_ratio), "norm_pix_loss": bool(self.obj.norm_pix_loss)}
        if self.video:
            sd["time_slice"] = {"tubelet": self.tubelet, "slice": self.time_slice}
        return sd

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint of another schedule or masking would resume a different run: refused."""
        mine = self.state_dict()
        for key, field in (("schedule", "diffmae.num_timesteps / diffmae.rho"),
                           ("mask_ratio", "diffmae.mask_ratio"), ("norm_pix_loss", "diffmae.norm_pix_loss"),
                           ("time_slice", "diffmae.tubelet / diffmae.time_slice")):
            # An image method has no time_slice: a video checkpoint's one differs from its None.
            if key in state and state[key] != mine.get(key):
                raise ResumeMismatch(f"the checkpoint's DiffMAE {key} {state[key]} differs from the config's "
                                 f"{mine.get(key)} ({field}); resume with the checkpoint's values")

    def export(self, out_dir: Path) -> None:
        """Nothing to write: DiffMAE keeps no fitted state beside the network."""

    # data -----------------------------------------------------------------------------------
    def slice_frames(self, x: torch.Tensor) -> torch.Tensor:
        """The frames of clips (B, C, T, H, W) that are noised and predicted: time slice
        `time_slice` of every tubelet, (B, C, T / tubelet, H, W)."""
        return x[:, :, self.time_slice::self.tubelet]

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> patchify (B, N, D); clips -> the slice frames' patches, time-major (the
        tubelets' order), (B, T' g^2, D)."""
        if x.dim() == 4:
            return patchify(x, self.p)
        f = self.slice_frames(x)
        B, C, T, H, W = f.shape
        t = patchify(f.transpose(1, 2).reshape(B * T, C, H, W), self.p)
        return t.reshape(B, T * t.shape[1], t.shape[2])

    def _unpatchify(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of _patchify: images (B, C, H, W), or the slice frames (B, C, T', H, W) of clips."""
        if like.dim() == 4:
            B, C, H, W = like.shape
            return unpatchify(t, self.p, H, W, C)
        B, C, T, H, W = like.shape
        Ts = len(range(self.time_slice, T, self.tubelet))
        img = unpatchify(t.reshape(B * Ts, t.shape[1] // Ts, t.shape[2]), self.p, H, W, C)
        return img.reshape(B, Ts, C, H, W).transpose(1, 2)

    def num_patches(self, x: torch.Tensor) -> int:
        """Patches (tubelets for clips) of one sample of x."""
        g = x.shape[-1] // self.p
        return g * g * (x.shape[2] // self.tubelet if x.dim() == 5 else 1)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder denoises and predicts: patchify(x) (B, N, D) (for clips, the slice of
        each tubelet), per-patch normalised (mean 0, variance 1 over D, as MAE's norm_pix_loss)
        when diffmae.norm_pix_loss."""
        t = self._patchify(x.float())
        return normalize_patches(t) if self.obj.norm_pix_loss else t

    def rows(self, batch: int, micro: int, accum: int) -> tuple[int, int]:
        """(first row in the step's global batch, global batch size) of this micro-batch."""
        return global_rows(batch, micro, accum, self.rank, self.world_size)

    def draw_mask(self, batch: int, num_patches: int, step: int, row: int, global_batch: int) -> PatchMask:
        return masking.random_masking(batch, num_patches, self.obj.mask_ratio, seed=self.cfg.engine.seed,
                                      step=step, row=row, global_batch=global_batch, device=self.device)

    def draw_t(self, batch: int, step: int, row: int, global_batch: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derive_seed(self.cfg.engine.seed, TAG_NOISE_LEVEL, step))
        t = torch.randint(0, self.schedule.num_timesteps, (global_batch,), generator=gen, device=self.device)
        return t[row:row + batch]

    def draw_eps(self, batch: int, num_patches: int, dim: int, step: int, row: int,
                 tag: int = TAG_NOISE) -> torch.Tensor:
        """(B, N, D) standard normal, row b from a generator keyed on (seed, tag, step, row + b): a
        whole global batch of eps is never drawn on one rank. Noise is indexed by patch position,
        so a patch's eps does not depend on which other patches are hidden."""
        eps = torch.empty(batch, num_patches, dim, device=self.device)
        gen = torch.Generator(device=self.device)
        for b in range(batch):
            gen.manual_seed(derive_seed(self.cfg.engine.seed, tag, step, row + b))
            eps[b] = torch.randn(num_patches, dim, generator=gen, device=self.device)
        return eps

    # loss -----------------------------------------------------------------------------------
    def __call__(self, model: torch.nn.Module, batch: Batch, step: int, micro: int = 0, accum: int = 1,
                 *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        x = batch.images
        B = x.shape[0]
        row, gb = self.rows(B, micro, accum)
        with nvtx_range("noise"), torch.no_grad():
            target = self.patches(x)
            N, D = target.shape[1:]
            mk = self.draw_mask(B, N, step, row, gb)
            t = self.draw_t(B, step, row, gb)
            x0 = gather_tokens(target, mk.ids_masked)
            eps = gather_tokens(self.draw_eps(B, N, D, step, row), mk.ids_masked)
            noisy = self.schedule.q_sample(x0, t, eps)
        kwargs = dict(ids_keep=mk.ids_keep, ids_masked=mk.ids_masked, noisy=noisy, t=t)
        if autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=autocast_dtype):
                pred = model(x, **kwargs)
        else:
            pred = model(x, **kwargs)
        with nvtx_range("loss"):
            # pred covers the hidden patches only: the visible ones carry no loss by construction.
            return masked_mse(pred, x0)

    # sampling -------------------------------------------------------------------------------
    def make_mask(self, kind: str, batch: int, grid: int, step: int = 0, frames: int = 1) -> PatchMask:
        """'random' (diffmae.mask_ratio, the draws of training step `step`) or 'center' (the
        central half of each side, in each of `frames` tubelet steps for clips)."""
        if kind == "random":
            return self.draw_mask(batch, grid * grid * frames, step, 0, batch)
        if kind == "center":
            return masking.center_block_mask(batch, grid, grid, 0.5, device=self.device, frames=frames)
        raise ValueError(f"mask={kind!r}; choose 'random' or 'center'")

    @torch.no_grad()
    def inpaint(self, model: torch.nn.Module, images: torch.Tensor, mask: PatchMask, *,
                steps: int | None = None, record: Sequence[int] = (), seed: int | None = None
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Reverse diffusion over the hidden patches given the visible ones.

        DDPM ancestral sampling with the network's x_0 prediction plugged into the posterior
        q(x_{t-1} | x_t, x_0), on `steps` timesteps strided evenly over 0..T-1 (the respaced chain
        keeps each step's abar; steps = T is plain DDPM). Starts from x_T ~ N(0, I), keyed on
        (seed, TAG_SAMPLE, row). Returns the final patches (B, N, D), visible ones untouched, and
        the x_0 prediction at the chain's step nearest each t in `record` (T counts as T - 1).
        """
        x = images.to(self.device).float()
        steps = steps or self.obj.sample_steps
        seed = self.cfg.engine.seed if seed is None else seed
        target = self.patches(x)
        B, N, D = target.shape
        M = mask.ids_masked.shape[1]
        ts, chain = self.schedule.respaced(steps)
        want = {}
        for r in record:
            k = int((ts - min(int(r), self.schedule.num_timesteps - 1)).abs().argmin())
            want.setdefault(k, []).append(int(r))
        snaps: dict[int, torch.Tensor] = {}
        with eval_mode(model):
            ctx = model.encode(x, mask.ids_keep)
            xt = gather_tokens(self.draw_eps(B, N, D, 0, 0, tag=TAG_SAMPLE), mask.ids_masked)
            gen = torch.Generator(device=self.device)
            for i in range(len(ts) - 1, -1, -1):
                t = torch.full((B,), int(ts[i]), device=self.device, dtype=torch.long)
                x0_hat = model.decode(ctx, mask.ids_keep, mask.ids_masked, xt, t).float()
                for r in want.get(i, ()):
                    snaps[r] = scatter_tokens(target, mask.ids_masked, x0_hat)
                c0, ct, var = chain.posterior(i)
                xt = c0 * x0_hat + ct * xt
                if i > 0:
                    gen.manual_seed(derive_seed(seed, TAG_SAMPLE, i + 1))
                    xt = xt + var ** 0.5 * torch.randn(B, M, D, generator=gen, device=self.device)
        return scatter_tokens(target, mask.ids_masked, xt), snaps

    def to_image(self, patches: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Patches in the decoder's space -> (B, C, H, W) (clips: the slice frames, (B, C, T',
        H, W)). Per-patch normalised patches are mapped back with each patch's own mean and
        variance from `images`, so such a figure borrows the hidden patches' statistics from the
        original (stated in docs/diffmae.md)."""
        if self.obj.norm_pix_loss:
            raw = self._patchify(images.to(patches.device).float())
            mu, var = raw.mean(-1, keepdim=True), raw.var(-1, keepdim=True)
            patches = patches * (var + NORM_PIX_EPS).sqrt() + mu
        return self._unpatchify(patches, images)

    def masked_input(self, images: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        """The images (clips: their slice frames) with hidden patches set to 0 (the dataset mean
        after normalisation)."""
        x = images.to(self.device).float()
        t = self._patchify(x) * (~mask.mask).unsqueeze(-1)
        return self._unpatchify(t, x)

    def sample(self, model: torch.nn.Module, images: torch.Tensor, levels: Sequence[int] = (1000, 500, 0), *,
               step: int = 0, mask: str = "random", steps: int | None = None
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level t in `levels`, (masked input, inpainted image at t): the x_0 prediction at that
        step of the reverse chain, with the visible patches kept; t = 0 is the final sample. For
        clips (B, C, T, H, W) both are the slice frames (B, C, T / tubelet, H, W)."""
        x = images.to(self.device).float()
        grid = x.shape[-1] // self.p
        frames = x.shape[2] // self.tubelet if x.dim() == 5 else 1
        mk = self.make_mask(mask, x.shape[0], grid, step, frames)
        final, snaps = self.inpaint(model, x, mk, steps=steps, record=[lv for lv in levels if lv > 0])
        snaps[0] = final
        masked = self.masked_input(x, mk)
        return [(masked, self.to_image(snaps[int(lv)], x)) for lv in levels]
