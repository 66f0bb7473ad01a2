"""MAE's named presets (`--preset NAME`). Plain data: config.py reads them through the registry."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # MAE on the demo's gratings, CPU minutes: the pixel-space control for demo / diffmae-demo
    # (the same encoder, data and probe; no noise). MAE's light decoder: one block, narrower than
    # the encoder; per-patch normalised targets as MAE's best setting.
    "mae-demo": {
        "objective.method": "mae", "model.size": "tiny", "model.patch_size": 4, "data.img_size": 32,
        "data.synthetic_kind": "gratings", "mae.mask_ratio": 0.75, "mae.norm_pix_loss": True,
        "model.decoder_width": 64, "model.decoder_heads": 2, "model.decoder_depth": 1,
        "data.batch_size": 64, "data.synthetic_images": 2048, "optim.blr": 1.5e-2, "optim.weight_decay": 0.05,
        "optim.warmup_epochs": 1, "optim.ema_decay": 0.0, "optim.clip_grad": 0.0, "engine.epochs": 30,
        "engine.log_every": 64, "eval.probe_epochs": 90, "eval.probe_blr": 10.0, "engine.out_dir": "runs/mae-demo",
    },
}
