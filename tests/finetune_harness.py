"""Runs eval.finetune_stream.run_finetune on tiny shards with a tiny ViT (or a tiny clip ViT with
--video), on 1 or N gloo ranks; the fine-tune tests start it as a subprocess (kill -9, world
sizes). Writes the model's and the EMA's state to OUT."""

from __future__ import annotations

import torch
from stream_harness import finish, join, launch, parser, pause, splits

RECIPE = dict(epochs=3, batch_size=16, blr=0.05, warmup_epochs=1.0, layer_decay=0.75, drop_path=0.1,
              ema_decay=0.9, reprob=0.25, rand_augment="rand-m9-mstd0.5-inc1")


def tiny_encoder(video: bool):
    from ldae_fast.config import build_config
    from ldae_fast.methods import build_model

    over = {"model.width": "32", "model.num_heads": "2", "model.encoder_depth": "2", "model.decoder_depth": "1",
            "model.decoder_heads": "2", "data.img_size": "16", "engine.kernels": "reference"}
    if video:
        over.update({"data.num_frames": "4", "model.tubelet": "2", "model.patch_size": "4"})
    torch.manual_seed(0)
    return build_model(build_config("diffmae-video-demo" if video else "diffmae-demo", over)).encoder


def _run(rank: int, a) -> None:
    join(rank, a)
    from ldae_fast.eval.finetune import FinetuneRecipe, build_finetune_model
    from ldae_fast.eval.finetune_stream import FinetuneSettings, run_finetune
    from ldae_fast.eval.finetune_video import ClipClassifier

    recipe = FinetuneRecipe(**RECIPE)
    clip = dict(clip_frames=4) if a.video else {}
    tr, va = splits(a.root, dict(rand_augment=recipe.rand_augment, repeats=2 if a.video else 1, **clip), clip)
    enc = tiny_encoder(a.video)
    if a.video:
        model = ClipClassifier(enc, 4, recipe.drop_path, 0.5, recipe.head_init_std, recipe.seed)
    else:
        model = build_finetune_model(enc, 4, recipe.drop_path, "avg", recipe.seed, recipe.head_init_std)
    s = FinetuneSettings(global_batch=16, micro_batch=a.micro, num_train=24 if a.video else 48, num_classes=4)
    res = run_finetune(model, tr, va, recipe, s, ckpt_dir=a.ckpt or None, ckpt_every=1, encoder_key="tiny",
                       num_workers=a.workers, on_step=pause(a), log=print if rank == 0 else None,
                       stop_after=a.stop_after)
    finish(rank, a, res, _tensors)


def _tensors(res: dict) -> dict:
    out = {f"model.{k}": v for k, v in res["state"].items()}
    out.update({f"ema.{k}": v for k, v in res["ema_state"].items()})
    out.update({k: torch.tensor(float(res[k])) for k in ("top1", "ema_top1", "last_loss", "resumed_from",
                                                         "val_images", "steps", "accumulation")})
    return out


def main() -> None:
    ap = parser(micro=2)
    ap.add_argument("--video", action="store_true")
    launch(_run, ap.parse_args())


if __name__ == "__main__":
    main()
