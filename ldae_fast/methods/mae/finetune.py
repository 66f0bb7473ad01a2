"""MAE's fine-tuning recipe (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners",
end-to-end fine-tuning), which `ldae-fast eval --protocols finetune` applies to MAE checkpoints
through MethodSpec.finetune_recipes: the pixel MAE is a control, so it is fine-tuned the way its
own paper does, not with l-DAE's recipe."""

from __future__ import annotations

from typing import Any

# As eval.finetune.FinetuneRecipe fields; lr = blr * batch / 256. Shared by every size: AdamW
# (0.9, 0.999), wd 0.05, 5 warm-up epochs then cosine to 1e-6, RandAug (9, 0.5), label smoothing
# 0.1, MixUp 0.8, CutMix 1.0, RandomErasing 0.25, batch 1024, average pooling, no EMA. Per size,
# the values of MAE's released fine-tuning commands (where the paper's one-column table gives a
# single setting, those commands are what reproduce its numbers).
_MAE_FT_COMMON = dict(batch_size=1024, min_lr=1e-6, warmup_epochs=5.0, weight_decay=0.05, betas=(0.9, 0.999),
                      mixup=0.8, cutmix=1.0, label_smoothing=0.1, rand_augment="rand-m9-mstd0.5-inc1",
                      reprob=0.25, pool="avg", ema_decay=0.0)
MAE_FINETUNE: dict[str, dict[str, Any]] = {
    "B": {**_MAE_FT_COMMON, "blr": 5e-4, "layer_decay": 0.65, "epochs": 100, "drop_path": 0.1},
    "L": {**_MAE_FT_COMMON, "blr": 1e-3, "layer_decay": 0.75, "epochs": 50, "drop_path": 0.2},
    "H": {**_MAE_FT_COMMON, "blr": 1e-3, "layer_decay": 0.75, "epochs": 50, "drop_path": 0.3},
}
