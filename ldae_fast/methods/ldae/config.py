"""l-DAE's sections of the run config: `noise` (`--noise.field=value`: the schedule, its loss
weights and the prediction target) and `ldae` (`--ldae.field=value`: how its network is cut in
two, what it is conditioned on, fed and returns). Plain data that validates itself with the config mechanism's checks (config.py); the spec
registers both, and the old spellings of the `ldae` fields (`model.layout`, `model.cond`, ...:
RENAMED), so saved configs and command lines that use them still load."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...config import _check, _one_of

LOSS_WEIGHTS = ("inv_1p_sigma2", "uniform", "gamma2")


# noise.schedule's names, torch-free so a config validates before torch is imported;
# schedules.SCHEDULES maps each to its code and checks it covers exactly these.
SCHEDULE_NAMES = ("sigma_linear", "ddpm_linear_beta", "linear_gamma2", "single_level")


@dataclass
class NoiseConfig:
    schedule: str = "sigma_linear"
    """'sigma_linear' (final: gamma=1, sigma linear 0..sigma_max), 'ddpm_linear_beta', 'linear_gamma2',
    'single_level' (gamma=1, sigma=single_sigma for every sample)."""
    sigma_max: float = math.sqrt(2.0)
    """Largest sigma of the sigma_linear schedule."""
    num_timesteps: int = 1000
    """T of the discrete DDPM schedule."""
    single_sigma: float = 1.0 / 3.0
    """sigma of the single_level schedule (l-DAE Sec. 4.3: sigma = 1/3 gives 61.5%)."""
    loss_weight: str = "inv_1p_sigma2"
    """lambda_t: 'inv_1p_sigma2' (1/(1+sigma^2), final), 'uniform' (1), 'gamma2' (gamma_t^2)."""
    low_weight: float = 1.0
    """w_i of the loss for the d principal components the noise lives in."""
    high_weight: float = 0.1
    """w_i of the loss for the remaining D-d components."""
    input_scaling: bool = False
    """Divide the network input by sqrt(gamma^2+sigma^2). Our option, not the paper's: l-DAE's
    "input scaling" (Table 3) is gamma_t scaling the clean latent, z_t = gamma_t z0 + sigma_t eps,
    and its "remove input scaling" row is noise.schedule=sigma_linear (gamma_t = 1, sigma_t linear
    0..sqrt(2)), with no divisor. On the variance-preserving schedules (ddpm_linear_beta,
    linear_gamma2) gamma^2 + sigma^2 = 1 and this does nothing; no preset sets it."""
    target: str = "x0"
    """What the loss compares the network's output image with: 'x0' (the original image, the
    w-weighted PCA-space loss: final), 'z0' (the clean latent) or 'eps' (the noise); for z0 / eps
    the output image is encoded through the tokenizer first (l-DAE Table 3's "output through
    inverse PCA") and the loss is lambda_t |latent(x_hat) - target|^2 per token."""

    def __post_init__(self) -> None:
        _one_of("noise.schedule", self.schedule, SCHEDULE_NAMES)
        _one_of("noise.loss_weight", self.loss_weight, LOSS_WEIGHTS)
        _check(self.single_sigma > 0, f"noise.single_sigma={self.single_sigma} must be > 0")
        _one_of("noise.target", self.target, ("x0", "z0", "eps"))
        _check(self.sigma_max > 0, f"noise.sigma_max={self.sigma_max} must be > 0")
        _check(self.num_timesteps >= 1, "noise.num_timesteps must be >= 1")
        _check(self.low_weight >= 0 and self.high_weight >= 0, "noise.*_weight must be >= 0")


# How l-DAE's network is cut in two (models/vit.py implements both).
LAYOUTS = ("dit", "mae")


@dataclass
class LDAEConfig:
    layout: str = "mae"
    """How l-DAE's network is cut in two (docs/model.md).
    'dit': the paper's (l-DAE App. A), DiT cut in two: the encoder is DiT's first blocks, the
    decoder the rest, on one token sequence (no class token), with nothing between them (no
    LayerNorm, no embedding), one sigma embedder shared by all blocks and a conditioning vector of
    width ldae.adaln_dim (width/4); features are the mean of the encoder's tokens.
    'mae': this project's first layout, MAE-shaped halves: a class token, an affine LayerNorm
    ending the encoder, a decoder embedding with its own position embedding, a sigma embedder per
    half, full-width adaLN. The default, so checkpoints written before this field existed (which
    store none) rebuild as what they were; the paper presets and the trajectory rows set 'dit'."""
    adaln_dim: int = 0
    """Width of the adaLN conditioning vector c (the sigma embedding, plus the label embedding
    with class conditioning) that every block's modulation Linear(adaln_dim, 6 width) and the
    final layer's Linear(adaln_dim, 2 width) read. 0: width/4 with layout 'dit' (our reading of
    l-DAE App. A's "1/4 of DiT's hidden size", docs/model.md), width with 'mae' (DiT's own); the
    network reads it through cond_width() and the 0 is what gets saved."""
    cond: str = "adaln"
    """Noise-level conditioning: 'adaln' (DiT-style adaLN-Zero on sigma_t) or 'none'."""
    class_cond: bool = False
    """Class conditioning as DiT's: a label embedding added to the adaLN conditioning, labels
    dropped to a null class at rate label_dropout in training; evaluation feeds the null class
    (l-DAE Table 1's first row, 57.5%). Its classes: model.num_classes."""
    label_dropout: float = 0.1
    """Probability a training label is replaced by the null class (DiT: 0.1)."""
    input: str = "image"
    """What the network is fed: 'image' (the noisy latent decoded through the tokenizer: final) or
    'latent' (the noisy latent tokens (B, N, d) themselves, l-DAE Table 3's rows before 'image
    input through inverse PCA'; d: model.latent_dim)."""
    output: str = "image"
    """What the network returns: 'image' (final) or 'latent' tokens (B, N, d), compared with the
    z0 / eps target directly."""

    def __post_init__(self) -> None:
        _one_of("ldae.layout", self.layout, LAYOUTS)
        _check(self.adaln_dim >= 0, f"ldae.adaln_dim={self.adaln_dim} must be >= 0 (0: from ldae.layout)")
        _one_of("ldae.cond", self.cond, ("adaln", "none"))
        _check(0 <= self.label_dropout < 1, f"ldae.label_dropout={self.label_dropout} must be in [0, 1)")
        _one_of("ldae.input", self.input, ("image", "latent"))
        _one_of("ldae.output", self.output, ("image", "latent"))
        _check(not self.class_cond or self.cond == "adaln",
               "ldae.class_cond needs ldae.cond='adaln' (the label joins the adaLN conditioning)")


def cond_width(width: int, net: LDAEConfig) -> int:
    """The width c has at model.width `width`: ldae.adaln_dim, or with 0 the layout's own. Derived
    on every read, never stored back, so a saved config holding 0 follows a later --ldae.layout or
    --model.width."""
    if net.adaln_dim:
        return net.adaln_dim
    return width // 4 if net.layout == "dit" else width


# Where these fields lived before they moved here: old saved configs and command lines still read.
RENAMED = {f"model.{name}": f"ldae.{name}"
           for name in ("layout", "adaln_dim", "cond", "class_cond", "label_dropout", "input", "output")}
