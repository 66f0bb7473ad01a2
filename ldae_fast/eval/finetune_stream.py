"""Fine-tuning over the streaming eval path: data-parallel (torch DDP), resumable, keyed.

The recipe (eval/finetune.py: FinetuneRecipe) is the method's: AdamW with layer-wise lr decay,
warm-up then half-cycle cosine per step, drop path, label smoothing, MixUp / CutMix, RandAugment,
RandomErasing, EMA; lr = blr * G / 256 at global batch G.

Data: the train shards through eval/stream.py with the fine-tune's transform (RandomResizedCrop
+ flip, then timm RandAugment, per sample, `repeats` views of each sample side by side for
repeated augmentation); validation resize + centre crop (a clip: its first window, the centre
square). The global batch is G / R samples of every logical reader (R readers, G % R == 0).

Micro-batches are defined on the logical readers, not on the ranks: with a micro-batch of at
least a reader's share s = G / R, a micro-batch is the shares of g = micro // s consecutive
readers (readers [0, g), [g, 2g), ...); with a smaller one, a piece of one reader's share; one larger than a rank's part of the global
batch (G / N) is cut to it, and then the micro-batches follow the rank count. Each
rank hosts a contiguous block of R / N readers and runs the micro-batches inside it one after the
other, accumulating gradients (DDP syncs on the last), so G = ranks x micro-batch x accumulation
whatever the machine. Each micro-batch's RandomErasing, MixUp / CutMix, drop-path and dropout
draws are keyed on (seed, step, its first reader, its piece) (eval/ft_augment.py), so a step
computes the same thing on any rank count: results differ only by the order of float sums.

Checkpoints (`ckpt_dir`/finetune-<fingerprint>.pt, every `ckpt_every` steps and at the end; rank
0 writes, atomically) hold the model, the EMA, the optimizer, the step and every logical reader's
data position; the lr is a function of the step and every random draw of (seed, step), so a run
killed at any point and started again ends bit-identical to one never interrupted (same machine).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ldae_fast.data.transforms import normalize
from ldae_fast.errors import ResumeMismatch, UsageError

from ..device import autocast_for, eval_mode
from ..lr_schedule import warmup_cosine
from . import dist as edist
from .features import Log, module_device
from .finetune import FinetuneRecipe
from .ft_augment import TAG_BATCH, keyed_rng
from .step_tail import StepTail
from .stream import EvalStream, SplitSpec
from .stream_accuracy import stream_topk
from .stream_ckpt import StreamCheckpoint

PROTOCOL = "finetune"


@dataclass(frozen=True)
class FinetuneSettings:
    """What, besides the recipe, changes the run's trajectory; a checkpoint resumes only under
    the same."""

    global_batch: int = 1024
    micro_batch: int = 64
    num_train: int = 0  # samples per epoch (before repeated augmentation)
    num_classes: int = 1000
    precision: str = "auto"

    def fingerprint(self, recipe: FinetuneRecipe, spec: SplitSpec, encoder_key: str) -> str:
        # max_steps only cuts the same trajectory short: a longer rerun continues the shorter one.
        r = {k: v for k, v in asdict(recipe).items() if k not in ("num_workers", "max_steps")}
        d = dict(asdict(self), recipe=r, urls=list(spec.urls), readers=spec.readers, buf=spec.shuffle_buffer,
                 max_images=spec.max_images, img_size=spec.img_size, frames=spec.clip_frames,
                 encoder=encoder_key)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Ema:
    """Exponential moving average of a model's parameters (buffers copied): after each
    optimizer step, ema = decay * ema + (1 - decay) * weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = list(self.module.parameters())
        cur = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, cur, 1.0 - self.decay)
        for b, c in zip(self.module.buffers(), model.buffers()):
            b.copy_(c)


def micro_batches(readers: list[int], share: int, micro: int) -> list[tuple[int, int, int, int]]:
    """(first reader, piece, lo, hi) of a rank's micro-batches, rows [lo, hi) of its step batch
    (its readers' shares in order); see the module docstring. A micro-batch larger than the
    rank's whole share is cut to it."""
    if micro >= share:
        g = min(micro // share, len(readers))
        return [(readers[i], 0, i * share, min(i + g, len(readers)) * share) for i in range(0, len(readers), g)]
    return [(r, k, j * share + lo, j * share + min(lo + micro, share))
            for j, r in enumerate(readers) for k, lo in enumerate(range(0, share, micro))]


def check_batch(G: int, readers: int, world_size: int, micro: int, repeats: int, mixing: bool) -> int:
    """The share of the global batch G per reader, or a UsageError naming the flag."""
    if G % readers:
        raise UsageError(f"--finetune-batch-size {G} is not a multiple of --readers={readers}: every logical "
                         "reader gives the same share of the global batch")
    share = G // readers
    if share % repeats:
        raise UsageError(f"--finetune-batch-size {G} / --readers={readers} = {share} per reader is not a "
                         f"multiple of the recipe's repeated augmentation ({repeats} views per sample)")
    per_rank = readers // max(world_size, 1)
    micro = min(micro, per_rank * share)
    if micro >= share and per_rank % (micro // share):
        raise UsageError(f"--micro-batch {micro} spans {micro // share} readers' shares ({share} images each), "
                         f"which does not divide the {per_rank} readers of each rank; pass a micro-batch "
                         f"of {share} x a divisor of {per_rank}, or one below {share}")
    m = min(micro, share) if micro < share else (micro // share) * share
    if mixing and (m % 2 or (micro < share and share % m % 2)):
        raise UsageError(f"--micro-batch {m} (with {share} images per reader) must give even micro-batches: "
                         "MixUp / CutMix pair each image of a micro-batch with another")
    return share


def _criterion(recipe: FinetuneRecipe, num_classes: int):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if recipe.mixup > 0 or recipe.cutmix > 0:
        mix = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=1.0, switch_prob=0.5,
                    mode="batch", label_smoothing=recipe.label_smoothing, num_classes=num_classes)
        return mix, SoftTargetCrossEntropy()
    if recipe.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=recipe.label_smoothing)
    return None, nn.CrossEntropyLoss()


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """Clips (B, C, T, H, W) as (B, C*T, H, W): the batch-level image ops (erasing, CutMix boxes)
    then cut the same box out of every frame."""
    return x.flatten(1, 2) if x.dim() == 5 else x


def _normalize(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 5:
        from ldae_fast.data.video import normalize_clips

        return normalize_clips(x)
    return normalize(x)


def evaluate(model: nn.Module, val: EvalStream, micro: int, precision: str = "auto") -> tuple[float, float, int]:
    """(top-1, top-5, samples) of the model on the validation stream, summed over ranks."""
    device = module_device(model)

    def logits(x: torch.Tensor) -> torch.Tensor:
        with autocast_for(device, precision):
            return model(_normalize(x.to(device, non_blocking=True))).float()

    with eval_mode(model):
        return stream_topk(val, micro, logits)


def run_finetune(
    model: nn.Module,
    train_spec: SplitSpec,
    val_spec: SplitSpec,
    recipe: FinetuneRecipe,
    settings: FinetuneSettings,
    *,
    ckpt_dir: Optional[str | os.PathLike] = None,
    ckpt_every: int = 100,
    encoder_key: str = "",
    num_workers: int = 0,
    log: Log = None,
    on_step: Optional[Callable[[int], None]] = None,
    stop_after: int = 0,
    desc: str = "finetune",
) -> dict:
    """Fine-tune `model` (a classifier on its device: timm's ViT or eval.finetune_video's
    ClipClassifier) on the augmented training stream, then evaluate it and its EMA on the
    validation stream; see the module docstring. `stop_after` > 0: checkpoint and return after
    that many steps of this call, without validation. Returns the result row and `state` (the
    model's tensors)."""
    from timm.data.random_erasing import RandomErasing
    from timm.optim import param_groups_layer_decay

    t_start = time.perf_counter()
    ranks = edist.current()
    s, N, G = settings, ranks.world_size, settings.global_batch
    R = train_spec.readers
    mix, criterion = _criterion(recipe, s.num_classes)
    share = check_batch(G, R, N, s.micro_batch, train_spec.repeats, mix is not None)
    device = module_device(model)
    erase = (RandomErasing(recipe.reprob, mode="pixel", max_count=1, device=str(device))
             if recipe.reprob > 0 else None)
    groups = param_groups_layer_decay(model, weight_decay=recipe.weight_decay,
                                      no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=recipe.layer_decay)
    lr = recipe.blr * G / 256
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(recipe.betas), **fused)
    ema = Ema(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    spe = max(1, s.num_train * train_spec.repeats // G)
    total = recipe.epochs * spe
    if recipe.max_steps:
        total = min(total, recipe.max_steps)

    fp = s.fingerprint(recipe, train_spec, encoder_key)
    ckpt = (StreamCheckpoint(ckpt_dir, "finetune", fp, what="fine-tune", flag="--finetune-dir")
            if ckpt_dir is not None else None)
    step0, positions = 0, None
    if ckpt is not None:
        sd, positions = ckpt.load()
        if sd is not None:
            model.load_state_dict(sd["model"])
            if ema is not None:
                ema.module.load_state_dict(sd["ema"])
            opt.load_state_dict(sd["opt"])
            step0 = int(sd["step"])
            if step0 > total:
                raise ResumeMismatch(f"{ckpt.path} is at step {step0}, past this run's {total} steps "
                                     "(--finetune-steps); ask for at least as many, or use another --finetune-dir")
            if log is not None:
                log(f"{desc}: resuming from {ckpt.path} at step {step0}/{total}")

    def save(step: int, pos: dict) -> None:
        ckpt.save(lambda: {"model": model.state_dict(), "ema": ema.module.state_dict() if ema else {},
                           "opt": opt.state_dict(), "step": step, "total_steps": total, "seed": train_spec.seed},
                  pos, ranks.main)

    net: nn.Module = model
    if ranks.distributed:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    train = EvalStream(train_spec, ranks.rank, N, num_workers, blocks=True)
    work = micro_batches(train.readers, share, s.micro_batch)
    micro = work[0][3] - work[0][2]
    if log is not None and ranks.main:
        log(f"{desc}: global batch {G} = {N} rank(s) x micro-batch {micro} x {len(work)} "
            f"accumulation, lr {lr:.3g} (blr {recipe.blr:g}), {recipe.epochs} epochs of {spe} steps, "
            f"layer decay {recipe.layer_decay}, drop path {recipe.drop_path}")
    tail = StepTail(desc=desc, what="fine-tune", hint="lower the learning rate (the recipe's blr)", total=total,
                    steps_per_epoch=spe, global_batch=G, step0=step0, main=ranks.main,
                    save=save if ckpt is not None else None, ckpt_every=ckpt_every, log=log, on_step=on_step,
                    stop_after=stop_after, t_start=t_start)
    loss_v = float("nan")
    model.train()
    if step0 < total:
        for step, x, y, pos in train.steps(share, step0, positions):
            cur = warmup_cosine(step / spe, lr, recipe.warmup_epochs, recipe.epochs, recipe.min_lr)
            for g in opt.param_groups:
                g["lr"] = cur * g.get("lr_scale", 1.0)
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for n, (reader, k, lo, hi) in enumerate(work):
                sync = n == len(work) - 1 or not ranks.distributed
                rows = slice(lo, hi)
                with (nullcontext() if sync else net.no_sync()), keyed_rng(train_spec.seed, TAG_BATCH, step,
                                                                          reader, k, device=device):
                    xb = _normalize(x[rows].to(device, non_blocking=True))
                    yb = y[rows].to(device, non_blocking=True)
                    flat = _as_images(xb)
                    if erase is not None:
                        flat = erase(flat)
                    if mix is not None:
                        flat, yb = mix(flat, yb)
                    xb = flat.view(xb.shape)
                    with autocast_for(device, s.precision):
                        out = net(xb)
                    # DDP averages the ranks' gradients: scale by N so the sum is the global mean.
                    loss = criterion(out.float(), yb) * ((hi - lo) * N / G)
                    loss.backward()
                loss_sum += loss.detach().double().cpu()
            opt.step()
            if ema is not None:
                ema.update(model)
            edist.all_sum(loss_sum)
            loss_v = float(loss_sum) / N
            if tail.end(step, pos, loss_v, cur):
                break
    if tail.stopped is not None:
        return tail.stopped
    val = EvalStream(val_spec, ranks.rank, N, num_workers)
    top1, top5, nval = evaluate(model, val, micro, s.precision)
    res = dict(protocol=PROTOCOL, top1=top1, top5=top5, epochs=total / spe, steps=total, lr=lr,
               batch_size=G, micro_batch=micro, ranks=N, accumulation=len(work),
               layer_decay=recipe.layer_decay, drop_path=recipe.drop_path, train_images=s.num_train,
               val_images=nval, num_classes=s.num_classes, feature_dim=int(getattr(model, "num_features", 0)),
               resumed_from=step0, last_loss=loss_v, bad_samples=train.stats()["bad"])
    if ema is not None:
        e1, e5, _ = evaluate(ema.module, EvalStream(val_spec, ranks.rank, N, num_workers), micro, s.precision)
        res.update(ema_top1=e1, ema_top5=e5, ema_decay=recipe.ema_decay)
    res["seconds"] = time.perf_counter() - t_start
    res["state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if ema is not None:
        res["ema_state"] = {k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()}
    return res


__all__ = ["FinetuneSettings", "run_finetune", "evaluate", "check_batch", "micro_batches", "Ema"]
