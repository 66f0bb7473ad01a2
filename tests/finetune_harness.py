"""Runs eval.finetune_stream.run_finetune on tiny shards with a tiny ViT (or a tiny clip ViT with
--video), on 1 or N gloo ranks; the fine-tune tests start it as a subprocess (kill -9, world
sizes). Writes the model's and the EMA's state to OUT."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

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
    torch.set_num_threads(1)
    if a.world > 1:
        dist.init_process_group("gloo", init_method=f"file://{a.out}.rdv", rank=rank, world_size=a.world)
    from ldae_fast.data.urls import expand_urls
    from ldae_fast.eval.finetune import FinetuneRecipe, build_finetune_model
    from ldae_fast.eval.finetune_stream import FinetuneSettings, run_finetune
    from ldae_fast.eval.finetune_video import ClipClassifier
    from ldae_fast.eval.stream import SplitSpec

    root = Path(a.root)
    recipe = FinetuneRecipe(**RECIPE)
    clip = dict(clip_frames=4) if a.video else {}
    tr = SplitSpec(tuple(expand_urls(str(root / "train-{000000..000003}.tar"), "train")), "train", 16, True,
                   shuffle_buffer=8, seed=1, readers=4, rand_augment=recipe.rand_augment,
                   repeats=2 if a.video else 1, **clip)
    va = SplitSpec(tuple(expand_urls(str(root / "val-000000.tar"), "val")), "val", 16, False, readers=4, **clip)
    enc = tiny_encoder(a.video)
    if a.video:
        model = ClipClassifier(enc, 4, recipe.drop_path, 0.5, recipe.head_init_std, recipe.seed)
    else:
        model = build_finetune_model(enc, 4, recipe.drop_path, "avg", recipe.seed, recipe.head_init_std)
    s = FinetuneSettings(global_batch=16, micro_batch=a.micro, num_train=24 if a.video else 48, num_classes=4)

    def on_step(done):
        if a.sleep:
            time.sleep(a.sleep)

    res = run_finetune(model, tr, va, recipe, s, ckpt_dir=a.ckpt or None, ckpt_every=1, encoder_key="tiny",
                       num_workers=a.workers, on_step=on_step, log=print if rank == 0 else None,
                       stop_after=a.stop_after)
    if rank == 0 and "stopped_at" in res:
        torch.save({"stopped_at": torch.tensor(res["stopped_at"])}, a.out)
    elif rank == 0:
        out = {f"model.{k}": v for k, v in res["state"].items()}
        out.update({f"ema.{k}": v for k, v in res["ema_state"].items()})
        out.update({k: torch.tensor(float(res[k])) for k in ("top1", "ema_top1", "last_loss", "resumed_from",
                                                             "val_images", "steps", "accumulation")})
        torch.save(out, a.out)
    if a.world > 1:
        # As tests/probe_harness.py: everyone past the last collective before the group goes.
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--stop-after", type=int, default=0)
    ap.add_argument("--video", action="store_true")
    a = ap.parse_args()
    if a.world > 1:
        torch.multiprocessing.spawn(_run, args=(a,), nprocs=a.world)
    else:
        _run(0, a)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
