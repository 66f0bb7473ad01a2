"""What the train-step benchmark (bench/train_step.py) measures of MAE: the paper's ImageNet shapes
and its light decoder; no timm peer row."""

from __future__ import annotations

from ..spec import BenchFlag, StepBench

FLOP_COUNT = ("ldae_fast.methods.mae.model.train_flops_per_image: forward (matmuls, 2 FLOPs per multiply-add; "
              "encoder blocks on 1 + n_keep tokens, decoder blocks on 1 + N, attention's quadratic terms "
              "included) x 3, less the image's gradient into the patch embedding; no timm peer")


def _row(cfg) -> dict:
    return {"mask_ratio": cfg.mae.mask_ratio,
            "decoder": f"{cfg.model.decoder_depth} x {cfg.model.__dict__['decoder_width'] or 'enc'}"}


def step_bench() -> StepBench:
    return StepBench(
        label="MAE ", gpu_defaults={"sizes": "B,L", "batch_sizes": "256", "img_size": 224}, variants="a,b,d",
        flags={"mask_ratio": BenchFlag("mae.mask_ratio", 0.75, "fraction of patches hidden from the encoder")},
        row=_row, flop_count=FLOP_COUNT)
