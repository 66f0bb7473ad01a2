"""The l-DAE deconstruction trajectory (Chen et al., arXiv 2401.14404, Tables 1-3, Fig. 5) as one
table of named presets.

Each row names the row it changes (`parent`) and the config overrides of that one change; a row's
full override set is its parent's with its own on top, rooted at the paper's ViT-1/2L recipe with
center crops and no augmentation (every trajectory row before the last, l-DAE Sec. 5 / App. A).
`config.PRESETS` holds every row under its name, so `--preset pca-d32` and
`ldae-fast ablate --rows pca-d8,pca-d32` read the same settings.

What cannot be reproduced as the paper had it is said in `note`: the DiT baseline's VQGAN and its
perceptual loss need supervised (VGG) weights that cannot be fetched, and would make the rows
illegitimate for self-supervised learning anyway, so those rows run with the project's own conv
VAE (tokenizer kind 'conv-vae', fitted by `ldae-fast fit-tokenizer`). Every row trains: l-DAE
noises the patch-wise AE / VAE through their encoder and decoder, the conv VAE through its
reference path (docs/tokenizers.md).

This module is plain data (it imports nothing of the project), so config.py can read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The tokenizer kinds the AE/VAE rows name; the tokenizer registry provides them.
PATCH_AE, PATCH_VAE, CONV_VAE = "patch-ae", "patch-vae", "conv-vae"
# The conv VAE's switch for its adversarial term (the tokenizer's own config field).
CONV_VAE_ADVERSARIAL = "tokenizer.adversarial"
LATENT_DIMS = (8, 16, 32, 64, 128)
# An override value that removes the key: a field of the conv VAE means nothing to another tokenizer.
UNSET = "<unset>"


@dataclass(frozen=True)
class Row:
    name: str
    parent: str | None
    """The row this one changes ('': the trajectory's base, `BASE`)."""
    change: str
    """The one change from the parent, in the paper's words."""
    paper_acc: float | None
    """The paper's linear-probe top-1 (ImageNet, DiT-L halves, 400 epochs); None where it prints none."""
    source: str
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""


# Settings every row shares unless a row changes them: the paper's pretraining recipe at the
# trajectory's scale (App. A), center crop (no augmentation), the network fed and predicting
# latent tokens (B, N, d), its target the noise. The paper's "input scaling" is gamma_t in
# z_t = gamma_t z0 + sigma_t eps, which the variance-preserving schedules of the first rows have
# and the sigma_linear schedule (gamma_t = 1) of "remove-input-scaling" drops.
BASE: dict[str, Any] = {
    "model.size": "halfL", "data.crop": "center", "noise.target": "eps",
    "ldae.input": "latent", "ldae.output": "latent",
}

# Table 1's tokenizer width: DiT's tokenizer maps a 256 px image to a 32x32x4 latent, so a 2x2
# latent token (one 16x16 patch) has 16 dimensions, and the paper says Table 1's last row (63.4)
# is Table 2's conv-VAE d = 16 entry (../shared/PAPERS.md, l-DAE Tables 1 and 2).
TABLE1_LATENT_DIM = 16

_ROWS: list[Row] = [
    # Table 1: from DiT towards a denoising autoencoder.
    Row("dit-cond", None, "DiT baseline (class-conditional, VQGAN, DDPM schedule, predict noise)", 57.5,
        "l-DAE Table 1",
        {"tokenizer.kind": CONV_VAE, CONV_VAE_ADVERSARIAL: True, "ldae.class_cond": True, "model.num_classes": 1000,
         "tokenizer.latent_dim": TABLE1_LATENT_DIM, "noise.schedule": "ddpm_linear_beta",
         "noise.loss_weight": "uniform"},
        note="our conv VAE with its adversarial term stands in for DiT's VQGAN (no perceptual loss: "
             "it needs supervised VGG weights)"),
    Row("dit-uncond", "dit-cond", "remove class conditioning", 62.5, "l-DAE Table 1",
        {"ldae.class_cond": False, "model.num_classes": 0}),
    Row("dit-no-perceptual", "dit-uncond", "tokenizer without perceptual loss", 58.4, "l-DAE Table 1",
        {}, note="same settings as the row above here: our tokenizer never had the perceptual loss"),
    Row("dit-no-adversarial", "dit-no-perceptual", "tokenizer without adversarial loss (KL conv VAE)",
        59.0, "l-DAE Table 1", {CONV_VAE_ADVERSARIAL: False}),
    Row("dit-linear-gamma2", "dit-no-adversarial", "noise schedule linear in gamma^2", 63.4,
        "l-DAE Table 1", {"noise.schedule": "linear_gamma2"}),
]

# Table 2: the tokenizer and its latent dimension d per token, from the Table 1 endpoint.
_TABLE2 = {
    CONV_VAE: (54.5, 63.4, 62.8, 57.0, 48.1),
    PATCH_VAE: (58.3, 64.9, 64.8, 56.8, None),
    PATCH_AE: (59.9, 64.7, 64.6, 59.9, None),
    "pca": (56.0, 63.4, 65.1, 60.0, 53.9),
}
for _kind, _accs in _TABLE2.items():
    _short = {"pca": "pca", PATCH_AE: "pae", PATCH_VAE: "pvae", CONV_VAE: "cvae"}[_kind]
    for _d, _acc in zip(LATENT_DIMS, _accs):
        _over: dict[str, Any] = {"tokenizer.kind": _kind, "tokenizer.latent_dim": _d, "model.patch_size": 16}
        _over[CONV_VAE_ADVERSARIAL] = False if _kind == CONV_VAE else UNSET
        _ROWS.append(Row(f"{_short}-d{_d}", "dit-linear-gamma2", f"tokenizer {_kind}, d={_d}", _acc,
                         "l-DAE Table 2", _over,
                         note="conv VAE's per-token d calibrated x4 as in the paper" if _kind == CONV_VAE else ""))

# Fig. 5: the pixel tokenizer (identity on patches of a resized image), sequence length 256.
for _img, _p, _acc in ((256, 16, 23.6), (128, 8, None), (64, 4, None), (32, 2, None)):
    _ROWS.append(Row(f"pixel-{_img}-{_p}", "dit-linear-gamma2", f"pixel tokenizer, image {_img}, patch {_p}",
                     _acc, "l-DAE Fig. 5",
                     {"tokenizer.kind": "pixel", "tokenizer.latent_dim": 3 * _p * _p, CONV_VAE_ADVERSARIAL: UNSET,
                      "model.patch_size": _p, "data.img_size": _img},
                     note="Fig. 5: 64/4 is the best and 128/8, 32/2 lie between; only 256/16 is printed"
                     if _acc is None else ""))

# Table 3 and the last steps, from the d=32 PCA entry.
_ROWS += [
    Row("lambda-gamma2", "pca-d32", "predict clean latent z0, lambda_t = gamma_t^2", 62.4, "l-DAE Table 3",
        {"noise.target": "z0", "noise.loss_weight": "gamma2"}),
    Row("remove-input-scaling", "lambda-gamma2",
        "gamma = 1, sigma linear 0..sqrt(2), lambda = 1/(1+sigma^2)", 63.6, "l-DAE Table 3",
        {"noise.schedule": "sigma_linear", "noise.loss_weight": "inv_1p_sigma2"}),
    Row("image-input", "remove-input-scaling", "image input through inverse PCA", 63.6, "l-DAE Table 3",
        {"ldae.input": "image"}),
    Row("image-output", "image-input", "image output through inverse PCA", 63.9, "l-DAE Table 3",
        {"ldae.output": "image"}),
    Row("predict-x0-w", "image-output",
        "predict the original image, loss lambda sum_i w_i r_i^2 (w = 1 / 0.1)", 64.5, "l-DAE Table 3",
        {"noise.target": "x0", "noise.low_weight": 1.0, "noise.high_weight": 0.1}),
    Row("single-level", "predict-x0-w", "single noise level sigma = 1/3", 61.5, "l-DAE Sec. 4.3",
        {"noise.schedule": "single_level"}),
    Row("random-crop", "predict-x0-w", "random resized crop (the final l-DAE)", 65.0, "l-DAE Sec. 5",
        {"data.crop": "random_resized"}),
]

ROWS: dict[str, Row] = {r.name: r for r in _ROWS}


def row_overrides(name: str) -> dict[str, Any]:
    """The row's full overrides: BASE, then every ancestor's change, then its own."""
    chain: list[Row] = []
    r: Row | None = ROWS[name]
    while r is not None:
        chain.append(r)
        r = ROWS[r.parent] if r.parent else None
    out = dict(BASE)
    for r in reversed(chain):
        out.update(r.overrides)
    return {k: v for k, v in out.items() if v != UNSET}


def trajectory_presets(recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every row as a preset: the paper recipe `recipe` with the row's overrides on top."""
    return {name: {**recipe, **row_overrides(name), "engine.out_dir": f"runs/{name}"} for name in ROWS}
