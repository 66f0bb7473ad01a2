"""l-DAE's named presets (`--preset NAME`): config overrides on the defaults, so
`--preset X --section.field=v` composes. Plain data: config.py reads them through the registry."""

from __future__ import annotations

from typing import Any

from ..spec import IMAGENET_TRAIN_IMAGES as _IMAGENET_EPOCH
from .trajectory import trajectory_presets

# l-DAE App. A: patch 16, d = 32 (Table 2: PCA d=32 65.1%, d=128 53.9%), batch 2048, blr 1e-4,
# 100 warm-up epochs, no weight decay, 400 epochs, AdamW as DiT's (betas 0.9, 0.999); probe at t = 10
# of 1000 with clean input, MAE's probe (batch 16384, blr 0.1: see eval.probe_blr for the lr);
# the network is DiT cut in two (ldae.layout='dit', adaLN conditioning at width/4).
_PAPER_RECIPE = {
    "model.patch_size": 16, "tokenizer.latent_dim": 32, "data.img_size": 256, "data.source": "wds",
    "data.epoch_size": _IMAGENET_EPOCH, "data.batch_size": 256, "data.num_workers": 10,
    "optim.blr": 1e-4, "optim.weight_decay": 0.0, "optim.warmup_epochs": 100, "engine.epochs": 400,
    "optim.beta1": 0.9, "optim.beta2": 0.999,
    "engine.backend": "deepspeed", "tokenizer.fit_images": 50_000, "engine.log_every": 50,
    "engine.ckpt_every": 2000, "optim.clip_grad": 0.0,
    "eval.probe_t": 10, "eval.probe_input": "clean", "eval.probe_batch_size": 16384, "eval.probe_blr": 0.1,
    "ldae.layout": "dit",
}

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds per step on 2 CPU cores: fits PCA, pretrains, figure and probe in a few minutes.
    # Gratings whose orientation is the class: colour and brightness say nothing about it, so the
    # probe shows what the pretraining learned about local structure (docs/results.md).
    "demo": {
        "model.size": "tiny", "model.patch_size": 4, "data.img_size": 32, "tokenizer.latent_dim": 16,
        "data.synthetic_kind": "gratings",
        "tokenizer.fit_images": 1024, "data.batch_size": 64, "data.synthetic_images": 2048,
        "optim.blr": 6e-3, "optim.warmup_epochs": 1, "engine.epochs": 10, "engine.log_every": 32,
        # 2048 images give LARS ~8 steps an epoch: its trust-ratio-limited head barely moves at
        # blr 0.1 (the ImageNet value, ~5000 steps an epoch), so the demo's probe uses blr 10.
        "eval.probe_epochs": 90, "eval.probe_blr": 10.0, "engine.out_dir": "runs/demo",
    },
    # ViT-S-sized model on Tiny ImageNet (64x64): ../shared/data/tinyimagenet-wds.
    "tiny-imagenet": {
        "model.size": "S", "model.patch_size": 8, "data.img_size": 64, "tokenizer.latent_dim": 32,
        "data.source": "wds", "data.train_shards": "../shared/data/tinyimagenet-wds/train-{000000..000009}.tar.gz",
        "data.val_shards": "../shared/data/tinyimagenet-wds/val-{000000..000001}.tar.gz",
        "data.epoch_size": 50_500, "data.batch_size": 128, "data.num_workers": 2,
        "tokenizer.fit_images": 10_000, "optim.blr": 1.5e-4, "optim.warmup_epochs": 5,
        "engine.epochs": 50, "engine.log_every": 20, "engine.ckpt_every": 500,
        "engine.out_dir": "runs/tiny-imagenet",
    },
    # The paper's ImageNet 256x256 recipes (global batch 2048 = 8 x 256 across ranks).
    "ldae-vitb": {**_PAPER_RECIPE, "model.size": "B", "engine.out_dir": "runs/ldae-vitb"},
    "ldae-vithalfl": {**_PAPER_RECIPE, "model.size": "halfL", "engine.out_dir": "runs/ldae-vithalfl"},
    "ldae-vitl": {**_PAPER_RECIPE, "model.size": "L", "engine.out_dir": "runs/ldae-vitl"},
    # The deconstruction trajectory, one preset per row (ldae_fast/methods/ldae/trajectory.py).
    **trajectory_presets(_PAPER_RECIPE),
}
