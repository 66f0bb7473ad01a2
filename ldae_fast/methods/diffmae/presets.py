"""DiffMAE's named presets (`--preset NAME`), images and video. Plain data: config.py reads
them through the registry."""

from __future__ import annotations

from typing import Any

from ..spec import IMAGENET_TRAIN_IMAGES as _IMAGENET_EPOCH

# DiffMAE's ImageNet pretraining (supplement Table 1a): AdamW (0.9, 0.95), wd 0.05, cosine after
# 40 warm-up epochs, hflip + RandomResizedCrop, drop path 0 (our blocks have none), blr 1.5e-4,
# batch 4096, 1600 epochs, no gradient clipping; 224 px, 75% masking, MAE's decoder (8 x 512).
# The decoder is cross-self with its blocks top-down connected to the encoder's, deepest first
# (DiffMAE Fig. 3 shows cross-self and cross decoders wired so; CrossMAE describes DiffMAE as
# decoding by cross-attention); which encoder block an 8-block decoder reads under a 12- or
# 24-block encoder is not in the text we have: 'deepest_first' is our reading (docs/diffmae.md).
_DIFFMAE_RECIPE = {
    "objective.method": "diffmae", "diffmae.mask_ratio": 0.75, "model.patch_size": 16,
    "model.decoder_width": 512, "model.decoder_depth": 8, "model.decoder_heads": 16,
    "diffmae.decoder_kind": "cross_self", "diffmae.decoder_topdown": "deepest_first",
    "data.img_size": 224, "data.source": "wds", "data.epoch_size": _IMAGENET_EPOCH,
    "data.batch_size": 256, "engine.grad_accum": 2, "data.num_workers": 10, "data.hflip": True,
    "data.crop_min_scale": 0.2, "optim.blr": 1.5e-4, "optim.beta1": 0.9, "optim.beta2": 0.95,
    "optim.weight_decay": 0.05, "optim.warmup_epochs": 40, "optim.min_lr": 0.0, "optim.clip_grad": 0.0,
    "optim.ema_decay": 0.0, "engine.epochs": 1600, "engine.backend": "deepspeed", "engine.log_every": 50,
    "engine.ckpt_every": 2000,
}
# DiffMAE's Kinetics-400 pretraining (supplement Table 1a, video column): blr 8e-4, batch 512,
# 400 epochs, gradient clipping 0.02, repeated augmentation 4, otherwise the image recipe (AdamW
# (0.9, 0.95), wd 0.05, cosine, 40 warm-up epochs, hflip + RandomResizedCrop, drop path 0);
# ViT-L with 2x16x16 (or 2x14x14) spacetime patches, 90% masking. 16 frames at temporal stride 4
# and 224 px are MAE-ST's input (our choice, not a supplement value). Batch 512 samples = 8 ranks
# x 64 (16 clips x 4 augmentations each); an epoch counts epoch_size samples (MAE-ST's
# "effective" epochs under repeated augmentation).
_KINETICS400_EPOCH = 240_000  # about the Kinetics-400 train split; set data.epoch_size to yours
_DIFFMAE_VIDEO_RECIPE = {
    **_DIFFMAE_RECIPE, "model.size": "L", "diffmae.tubelet": 2, "diffmae.mask_ratio": 0.9,
    "data.source": "wds-video", "data.num_frames": 16, "data.frame_stride": 4,
    "data.epoch_size": _KINETICS400_EPOCH, "data.batch_size": 64, "engine.grad_accum": 1,
    "data.repeated_aug": 4, "optim.blr": 8e-4, "optim.clip_grad": 0.02, "engine.epochs": 400,
    # Each worker's shuffle buffer holds whole stored clips (a 64-frame 256x340 clip is ~17 MB):
    # the image recipes' 2000 x 10 workers would ask for hundreds of GB per rank (docs/diffmae.md).
    "data.shuffle_buffer": 32, "data.num_workers": 4, "eval.probe": False,
}
DIFFMAE_VIDEO_GLOBAL_BATCH = 512
# DiffMAE's global batch (supplement Table 1a): the recipes reach it with 8 ranks x 256 x 2.
DIFFMAE_GLOBAL_BATCH = 4096

PRESETS: dict[str, dict[str, Any]] = {
    # DiffMAE on the built-in data: a tiny masked encoder + joint decoder, CPU minutes. The demo's
    # gratings: this encoder's blocks are not zero-initialised, so its random-init probe floor is
    # high there (~85%), and the pretrained probe still clears it (docs/diffmae.md). blr and
    # length were tuned on seed 0; one decoder block halves the step time of two, which buys twice
    # the steps in the same minutes.
    "diffmae-demo": {
        "objective.method": "diffmae", "model.size": "tiny", "model.patch_size": 4, "data.img_size": 32,
        "data.synthetic_kind": "gratings",
        "model.decoder_depth": 1, "data.batch_size": 64, "data.synthetic_images": 2048,
        "optim.blr": 1.6e-2, "optim.weight_decay": 0.05, "optim.warmup_epochs": 1, "optim.ema_decay": 0.0,
        "optim.clip_grad": 0.0, "engine.epochs": 60, "engine.log_every": 64, "diffmae.sample_steps": 50,
        "eval.probe_epochs": 90, "eval.probe_blr": 10.0, "engine.out_dir": "runs/diffmae-demo",
    },
    "diffmae-vitb": {**_DIFFMAE_RECIPE, "model.size": "B", "engine.out_dir": "runs/diffmae-vitb"},
    "diffmae-vitl": {**_DIFFMAE_RECIPE, "model.size": "L", "engine.out_dir": "runs/diffmae-vitl"},
    "diffmae-vith": {**_DIFFMAE_RECIPE, "model.size": "H", "model.patch_size": 14,
                     "engine.out_dir": "runs/diffmae-vith"},
    # DiffMAE on video: 8-frame clips of moving shapes at 32 px, 2x4x4 tubelets, 90% masking.
    "diffmae-video-demo": {
        "objective.method": "diffmae", "model.size": "tiny", "model.patch_size": 4, "diffmae.tubelet": 2,
        "data.img_size": 32, "data.num_frames": 8, "data.synthetic_kind": "moving-shapes",
        "diffmae.mask_ratio": 0.9, "model.decoder_depth": 2, "data.batch_size": 32,
        "data.synthetic_images": 512, "optim.blr": 1.2e-2, "optim.weight_decay": 0.05, "optim.warmup_epochs": 1,
        "optim.ema_decay": 0.0, "optim.clip_grad": 0.0, "engine.epochs": 6, "engine.log_every": 8,
        "diffmae.sample_steps": 50, "eval.probe": False, "engine.out_dir": "runs/diffmae-video-demo",
    },
    "diffmae-video-vitl": {**_DIFFMAE_VIDEO_RECIPE, "engine.out_dir": "runs/diffmae-video-vitl"},
    "diffmae-video-vitl14": {**_DIFFMAE_VIDEO_RECIPE, "model.patch_size": 14,
                             "engine.out_dir": "runs/diffmae-video-vitl14"},
}
