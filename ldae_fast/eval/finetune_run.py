"""`ldae-fast eval --protocols finetune` on shards: the method's recipe, the split specs with the
fine-tune's transform, the classifier (timm's ViT for images, eval.finetune_video's for clips),
then eval.finetune_stream.run_finetune. One call per encoder (checkpoint, random init)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ldae_fast.errors import UsageError

from . import dist as edist
from .features import Log
from .finetune import FinetuneRecipe, build_finetune_model, recipe_for_method
from .finetune_stream import FinetuneSettings, run_finetune
from .stream import split_spec


@dataclasses.dataclass
class FinetuneArgs:
    """The command line's part of a streamed fine-tune."""

    out_dir: Path
    readers: Optional[int] = None
    micro_batch: int = 256
    num_workers: int = 0
    ckpt_every: int = 100
    seed: int = 0
    max_train: Optional[int] = None
    max_val: Optional[int] = None


def finetune_readers(G: int, repeats: int, world_size: int, num_workers: int, asked: Optional[int],
                     even: bool = False) -> int:
    """--readers when given; else the smallest multiple of ranks x workers >= 16 (or, failing
    that, the largest below; with none, the largest multiple of the ranks up to ranks x workers,
    or the smallest above) whose share of the global batch is a whole number of repeated samples
    (and even when `even`: MixUp / CutMix pair the images of a micro-batch)."""
    if asked:
        return asked
    step = repeats * (2 if even else 1)
    unit = world_size * max(1, num_workers)

    def fitting(every: int) -> list[int]:
        return [r for r in range(every, G + 1, every) if G % r == 0 and (G // r) % step == 0]

    fits = fitting(unit)
    if fits:
        big = [r for r in fits if r >= 16]
        return big[0] if big else fits[-1]
    # None is a multiple of ranks x workers: the most readers up to that over the ranks alone
    # (valid on any rank count; the workers then split each rank's readers as evenly as they can).
    fits = fitting(world_size)
    if not fits:
        raise UsageError(f"--finetune-batch-size {G}: no reader count that is a multiple of the {world_size} "
                         f"rank(s) splits it evenly; pass --readers (a multiple of the rank count dividing the "
                         "batch) or another batch size")
    below = [r for r in fits if r <= unit]
    return below[-1] if below else fits[0]


def recipe_of(cfg, method_name: str, encoder, over: dict) -> tuple[FinetuneRecipe, str]:
    video = bool(cfg.model.num_frames)
    try:
        return recipe_for_method(method_name, cfg.model.size, cfg.model.encoder_depth, encoder, video=video, **over)
    except ValueError as e:
        raise UsageError(f"--protocols finetune: {e}") from None


def finetune_streamed(cfg, name: str, encoder, recipe: FinetuneRecipe, fa: FinetuneArgs, *, num_classes: int,
                      num_train: int, device, log: Log) -> dict:
    """The result row of fine-tuning `encoder` (not modified) on cfg.data's shards."""
    from .feature_store import weights_hash
    from .finetune_video import ClipClassifier

    ranks = edist.current()
    G = recipe.batch_size
    R = finetune_readers(G, recipe.repeated_aug, ranks.world_size, fa.num_workers, fa.readers,
                         even=recipe.mixup > 0 or recipe.cutmix > 0)
    train = split_spec(cfg, "train", augment=True, readers=R, seed=fa.seed, max_images=fa.max_train,
                       rand_augment=recipe.rand_augment, repeats=recipe.repeated_aug)
    train = dataclasses.replace(train, scale=(recipe.min_crop_scale, 1.0))
    val = split_spec(cfg, "val", augment=False, readers=R, seed=fa.seed, max_images=fa.max_val)
    if cfg.model.num_frames:
        model = ClipClassifier(encoder, num_classes, recipe.drop_path, recipe.dropout, recipe.head_init_std,
                               recipe.seed)
    else:
        model = build_finetune_model(encoder, num_classes, recipe.drop_path, recipe.pool, recipe.seed,
                                     recipe.head_init_std, recipe.dropout)
    model = model.to(device)
    s = FinetuneSettings(global_batch=G, micro_batch=fa.micro_batch, num_train=num_train, num_classes=num_classes)
    res = run_finetune(model, train, val, recipe, s, ckpt_dir=fa.out_dir, ckpt_every=fa.ckpt_every,
                       encoder_key=weights_hash(encoder), num_workers=fa.num_workers, log=log,
                       desc=f"finetune/{name}")
    res.pop("state", None)
    res.pop("ema_state", None)
    return res


__all__ = ["FinetuneArgs", "finetune_readers", "finetune_streamed", "recipe_of"]
