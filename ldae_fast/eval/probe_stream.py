"""The full linear probe over the streaming eval path: MAE's protocol, data-parallel, resumable.

Protocol (MAE main_linprobe.py, l-DAE App. A): frozen encoder, pooled features, BatchNorm
without affine parameters, one linear layer; LARS (momentum 0.9, trust 0.001, no weight decay),
lr = blr * G / 256 at global batch G (the paper: 16384, blr 0.1), linear warm-up for 10 of 90
epochs then half-cycle cosine, per step; RandomResizedCrop(0.08-1) + flip on the training images,
resize + centre crop for validation.

The global batch G is ranks x micro-batch x accumulation: each rank runs the frozen encoder on its
G / N images in micro-batches (no gradient, so accumulation costs only the (G/N, F) feature rows),
then the head takes one step on the whole global batch. The BatchNorm statistics of that step are
the global batch's (sums all-reduced), so the step is the same whatever the split into ranks,
micro-batches and accumulation. (MAE normalises per GPU, so its result moves with the GPU count.)

Checkpoints (`ckpt_dir`/probe-<fingerprint of the settings>.pt, every `ckpt_every` steps and at the end; rank 0 writes, atomically) hold
the head with its BatchNorm running statistics, the LARS momentum, the step and every logical
reader's data position: a run killed at any point and started again with the same arguments
ends bit-identical to one that was never interrupted (on the same machine).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldae_fast.data.transforms import normalize
from ldae_fast.errors import UsageError

from ..device import autocast_for, eval_mode
from ..lr_schedule import warmup_cosine
from . import dist as edist
from .features import Log, feature_dim, module_device, pool_features
from .lars import LARS
from .linear_probe import FULL_PROTOCOL, LinearHead, default_warmup, lars_budget
from .step_tail import StepTail
from .stream import EvalStream, SplitSpec, batch_shares
from .stream_accuracy import stream_topk
from .stream_ckpt import StreamCheckpoint


@dataclass(frozen=True)
class ProbeSettings:
    """The probe's settings; a checkpoint resumes only under the same (`fingerprint`: all but the
    micro-batch)."""

    epochs: int = 90
    global_batch: int = 16384
    micro_batch: int = 256
    blr: float = 0.1
    warmup_epochs: float = -1.0  # < 0: min(10, epochs / 9)
    num_train: int = 0  # images per epoch
    num_classes: int = 1000
    seed: int = 0
    pool: str = "avg"
    bn_momentum: float = 0.1
    precision: str = "auto"

    def fingerprint(self, spec: SplitSpec, encoder_key: str) -> str:
        """The settings a resume must share. Not the micro-batch: it only cuts a step's images
        into forwards (the head steps on the whole global batch), so a probe resumed on another
        rank count, where G / N caps it, continues; a view whose features do depend on it (a
        noisy-input probe's noise) puts it in `encoder_key`."""
        d = dict(asdict(self), urls=list(spec.urls), readers=spec.readers, buf=spec.shuffle_buffer,
                 max_images=spec.max_images, img_size=spec.img_size, encoder=encoder_key)
        d.pop("micro_batch")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _global_bn(f: torch.Tensor, n_global: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalised rows, batch mean, biased batch var) with the statistics of the global batch."""
    s = torch.stack([f.double().sum(0), (f.double() ** 2).sum(0)])
    edist.all_sum(s)
    mean = s[0] / n_global
    var = (s[1] / n_global - mean ** 2).clamp_min(0)
    return ((f - mean.float()) / torch.sqrt(var.float() + eps)), mean, var


def _features(encoder: nn.Module, x_u8: torch.Tensor, micro: int, pool: str, precision: str,
              device: torch.device) -> torch.Tensor:
    out = []
    for xb in x_u8.split(micro):
        xb = normalize(xb.to(device, non_blocking=True))
        with torch.no_grad(), autocast_for(device, precision):
            out.append(pool_features(encoder, xb, pool).float())
    return torch.cat(out) if out else torch.zeros(0, feature_dim(encoder), device=device)


def evaluate_stream(encoder: nn.Module, head: nn.Module, val: EvalStream, *, micro: int, pool: str,
                    precision: str = "auto") -> tuple[float, float, int]:
    """(top-1, top-5, images) of the head on the validation stream, summed over ranks."""
    device = module_device(encoder)
    head.eval()
    with eval_mode(encoder):
        return stream_topk(val, micro, lambda x: head(_features(encoder, x, micro, pool, precision, device)))


def run_probe(
    encoder: nn.Module,
    train_spec: SplitSpec,
    val_spec: SplitSpec,
    settings: ProbeSettings,
    *,
    ckpt_dir: Optional[str | os.PathLike] = None,
    ckpt_every: int = 100,
    encoder_key: str = "",
    num_workers: int = 0,
    log: Log = None,
    on_step: Optional[Callable[[int], None]] = None,
    stop_after: int = 0,
    desc: str = "linear",
) -> dict:
    """Train the probe head on the augmented training stream and evaluate it on the validation
    stream; see the module docstring. Returns the result row and `state` (the head's tensors).
    `stop_after` > 0: checkpoint and return after that many steps of this call, without the
    validation pass (a job with a time slot; the next run resumes)."""
    t_start = time.perf_counter()
    ranks = edist.current()
    s = settings
    N = ranks.world_size
    G = s.global_batch
    if G < train_spec.readers:
        raise UsageError(f"--batch-size {G} (the probe's global batch) is smaller than --readers="
                         f"{train_spec.readers}: every logical reader gives at least one image per step")
    device = module_device(encoder)
    dim = feature_dim(encoder)
    head = LinearHead(dim, s.num_classes, s.seed).to(device)
    head.bn.momentum = s.bn_momentum
    spe = max(1, s.num_train // G)
    total = s.epochs * spe
    lr = s.blr * G / 256
    warmup = default_warmup(s.epochs) if s.warmup_epochs < 0 else s.warmup_epochs
    opt = LARS(head.fc.parameters(), lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001)
    fp = s.fingerprint(train_spec, encoder_key)
    # One file per fingerprint: another checkpoint or other settings in the same directory start
    # their own run instead of resuming this one.
    ckpt = (StreamCheckpoint(ckpt_dir, "probe", fp, what="probe", flag="--probe-dir",
                             differs="epochs, batch, lr, data, readers or encoder changed")
            if ckpt_dir is not None else None)
    step0, positions = 0, None
    if ckpt is not None:
        sd, positions = ckpt.load()
        if sd is not None:
            head.load_state_dict(sd["head"])
            opt.load_state_dict(sd["opt"])
            step0 = int(sd["step"])
            if log is not None:
                log(f"{desc}: resuming from {ckpt.path} at step {step0}/{total}")

    def save(step: int, pos: dict) -> None:
        ckpt.save(lambda: {"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "total_steps": total},
                  pos, ranks.main)

    train = EvalStream(train_spec, ranks.rank, N, num_workers)
    per_reader = batch_shares(G, train_spec.readers)
    tail = StepTail(desc=desc, what="probe", hint="lower --blr", total=total, steps_per_epoch=spe,
                    global_batch=G, step0=step0, main=ranks.main, save=save if ckpt is not None else None,
                    ckpt_every=ckpt_every, log=log, on_step=on_step, stop_after=stop_after, t_start=t_start)
    loss_v = float("nan")
    if step0 < total:
        head.train()
        with eval_mode(encoder):
            for step, x, y, pos in train.steps(per_reader, step0, positions):
                f = _features(encoder, x, s.micro_batch, s.pool, s.precision, device)
                fn, mean, var = _global_bn(f, G, head.bn.eps)
                with torch.no_grad():
                    m = head.bn.momentum
                    head.bn.running_mean.mul_(1 - m).add_(mean.float(), alpha=m)
                    head.bn.running_var.mul_(1 - m).add_((var * G / max(G - 1, 1)).float(), alpha=m)
                    head.bn.num_batches_tracked += 1
                cur = warmup_cosine(step / spe, lr, warmup, s.epochs)
                for g in opt.param_groups:
                    g["lr"] = cur
                logits = head.fc(fn)
                loss = F.cross_entropy(logits, y.to(device), reduction="sum") / G
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p in head.fc.parameters():
                    edist.all_sum(p.grad)
                opt.step()
                loss_t = loss.detach().clone()
                edist.all_sum(loss_t)
                loss_v = float(loss_t)
                if tail.end(step, pos, loss_v, cur):
                    break
    if tail.stopped is not None:
        return tail.stopped
    val = EvalStream(val_spec, ranks.rank, N, num_workers)
    top1, top5, nval = evaluate_stream(encoder, head, val, micro=s.micro_batch, pool=s.pool,
                                       precision=s.precision)
    st = train.stats()
    return dict(protocol=FULL_PROTOCOL, top1=top1, top5=top5, epochs=s.epochs, feature_dim=dim, lr=lr,
                batch_size=G, micro_batch=s.micro_batch, ranks=N,
                accumulation=max(1, math.ceil(G / N / max(1, s.micro_batch))),
                lars_budget=lars_budget(s.epochs, spe, lr), train_images=s.num_train, val_images=nval,
                num_classes=s.num_classes, steps=total, resumed_from=step0, last_loss=loss_v,
                bad_samples=st["bad"], seconds=time.perf_counter() - t_start,
                state={k: v.detach().cpu().clone() for k, v in head.state_dict().items()})


__all__ = ["ProbeSettings", "run_probe", "evaluate_stream"]
