"""DiffMAE's fine-tuning recipe (supplement Table 1b), which `ldae-fast eval --protocols finetune`
applies to DiffMAE checkpoints through MethodSpec.finetune_recipes."""

from __future__ import annotations

from typing import Any

# The supplement's Table 1b (ImageNet fine-tuning of the pretrained encoder, pixel targets), as
# eval.finetune.FinetuneRecipe fields; lr = blr * batch / 256. Shared by every size: AdamW
# (0.9, 0.999), wd 0.05, cosine to 1e-6 after 5 warm-up epochs, RandAug (9, 0.5), mixup 0.8,
# cutmix 1.0, label smoothing 0.1, batch 1024; the head is average pool, a fresh LayerNorm and a
# linear layer whose init the supplement prints as "std 2^-5" (see DIFFMAE_HEAD_INIT_STD).
_DIFFMAE_FT_COMMON = dict(batch_size=1024, min_lr=1e-6, warmup_epochs=5.0, weight_decay=0.05,
                          betas=(0.9, 0.999), mixup=0.8, cutmix=1.0, label_smoothing=0.1,
                          rand_augment="rand-m9-mstd0.5-inc1", pool="avg")
DIFFMAE_FINETUNE: dict[str, dict[str, Any]] = {
    "B": {**_DIFFMAE_FT_COMMON, "blr": 5e-4, "layer_decay": 0.65, "epochs": 100, "drop_path": 0.1},
    "L": {**_DIFFMAE_FT_COMMON, "blr": 1e-3, "layer_decay": 0.7, "epochs": 50, "drop_path": 0.1},
    "H": {**_DIFFMAE_FT_COMMON, "blr": 1e-3, "layer_decay": 0.75, "epochs": 50, "drop_path": 0.3},
}
# The head's init std. The supplement prints "2^-5" and calls it very small, but 2^-5 = 0.031 is
# above the usual ViT linear init (0.02); MAE's fine-tuning, which this recipe follows, draws the
# head with std 2e-5, which is very small. We read the print as 2e-5 (the default of
# eval.finetune.FinetuneRecipe.head_init_std); `ldae-fast eval --finetune-head-init=printed`
# takes the printed 2^-5 instead (config.HEAD_INIT_STD_AS_PRINTED, docs/diffmae.md).
DIFFMAE_HEAD_INIT_STD = 2e-5
