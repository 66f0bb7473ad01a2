"""DiffMAE's section of the run config (`--diffmae.field=value`): masking, its noise schedule's
length and exponent, inpainting steps and the decoder's wiring. Plain data that validates itself with the
config mechanism's checks (config.py); the spec registers it, and the old spellings of its fields
(`objective.mask_ratio`, `model.decoder_kind`, ...: RENAMED), so saved configs and command lines
that use them still load, and the field it took over from l-DAE's section (TOOK_OVER)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import _check, _one_of

DECODER_KINDS = ("joint", "cross", "cross_self")
TOPDOWN_MODES = ("last", "deepest_first", "spread")


@dataclass
class DiffMAEConfig:
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder, per sample."""
    num_timesteps: int = 1000
    """T of DiffMAE's discrete DDPM schedule: training draws t from 0..T-1, inpainting runs back from T-1.
    Before this field DiffMAE read l-DAE's noise.num_timesteps: a saved DiffMAE config or
    checkpoint that stores noise.num_timesteps and no diffmae.num_timesteps loads with that T here
    (TOOK_OVER; l-DAE's noise section then reads its default), so it resumes and evaluates with the
    schedule it trained with."""
    rho: float = 0.8
    """Every DDPM beta (linear 1e-4..0.02 over diffmae.num_timesteps) raised to rho; smaller rho,
    more noise (the supplement compares 1.0, 0.8, 0.6)."""
    norm_pix_loss: bool = False
    """Diffuse and predict per-patch normalised pixels (MAE's target) instead of pixels."""
    sample_steps: int = 100
    """Inpainting: reverse-diffusion steps (strided over diffmae.num_timesteps; T = all)."""
    time_slice: int = 0
    """Video: which frame of each tubelet is noised and predicted (0 .. diffmae.tubelet-1; the
    target and the decoder's noisy input are that single time slice, docs/diffmae.md)."""
    decoder_kind: str = "joint"
    """Decoder: 'joint' (self-attention over encoder and noised tokens together), 'cross' (noised
    tokens cross-attend to the encoder) or 'cross_self' (cross-, then self-attention). 'joint' is
    the default so checkpoints saved before the DiffMAE presets chose 'cross_self' rebuild as what
    they were; the presets set it (docs/diffmae.md)."""
    decoder_topdown: str = "last"
    """Which encoder block each block of a 'cross' / 'cross_self' decoder reads: 'last' (every
    block the encoder's final output), 'deepest_first' (decoder block i reads encoder block
    L_e-1-i, clamped at 0: DiffMAE Fig. 3's top-down wiring) or 'spread' (block i reads encoder
    block L_e-1-floor(i L_e / L_d): deepest first, evenly spaced over the encoder when the decoder
    is shallower). 'last' is the default (a checkpoint saved before this field existed stores none
    and rebuilds as it was) and the only choice with 'joint'; the DiffMAE ImageNet and video
    presets set 'deepest_first' (docs/diffmae.md)."""
    tubelet: int = 1
    """Video: frames per spacetime patch (tubelet x patch_size x patch_size; the paper's 2x16x16
    is tubelet 2); 1 for images."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.mask_ratio < 1.0, f"diffmae.mask_ratio={self.mask_ratio} must lie in [0, 1)")
        _check(self.num_timesteps >= 1, f"diffmae.num_timesteps={self.num_timesteps} must be >= 1")
        _check(self.rho > 0, f"diffmae.rho={self.rho} must be > 0")
        _check(self.sample_steps >= 1, f"diffmae.sample_steps={self.sample_steps} must be >= 1")
        _check(self.time_slice >= 0, f"diffmae.time_slice={self.time_slice} must be >= 0")
        _one_of("diffmae.decoder_kind", self.decoder_kind, DECODER_KINDS)
        _one_of("diffmae.decoder_topdown", self.decoder_topdown, TOPDOWN_MODES)
        _check(self.decoder_topdown == "last" or self.decoder_kind != "joint",
               f"diffmae.decoder_topdown={self.decoder_topdown!r} needs diffmae.decoder_kind=cross or "
               "cross_self (the joint decoder reads the encoder's final output only: set "
               "diffmae.decoder_topdown=last)")
        _check(self.tubelet >= 1, f"diffmae.tubelet={self.tubelet} must be >= 1")


# Where these fields lived before they moved here: old saved configs and command lines still read.
RENAMED = {
    **{f"objective.{k}": f"diffmae.{k}" for k in ("mask_ratio", "rho", "norm_pix_loss", "sample_steps", "time_slice")},
    **{f"model.{k}": f"diffmae.{k}" for k in ("decoder_kind", "decoder_topdown", "tubelet")},
}

# Fields of another method's section DiffMAE read before it had its own: a stored DiffMAE config
# that sets the old key and not the new one loads the old key's value here (config.migrate).
TOOK_OVER = {"noise.num_timesteps": "diffmae.num_timesteps"}
