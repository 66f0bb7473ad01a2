"""l-DAE's fine-tuning recipe (its App. B), which `ldae-fast eval --protocols finetune` applies to
l-DAE checkpoints through MethodSpec.finetune_recipes."""

from __future__ import annotations

from typing import Any

# App. B, as eval.finetune.FinetuneRecipe fields (whose defaults are the rest of it: batch 1024,
# lr 4e-3 = blr 1e-3 x 1024 / 256, wd 0.05, drop path 0.1, 100 epochs, MixUp 0.8, CutMix 1.0,
# RandAug (9, 0.5), EMA 0.9999, and MAE's practice where the paper states nothing). Only the
# layer-wise lr decay depends on the size: 0.85 for ViT-B (and the 12-block ViT-1/2L), 0.65 for
# ViT-L; a size the table lacks takes the entry of the nearest encoder depth.
LDAE_FINETUNE: dict[str, dict[str, Any]] = {
    "B": {"layer_decay": 0.85},
    "L": {"layer_decay": 0.65},
}
