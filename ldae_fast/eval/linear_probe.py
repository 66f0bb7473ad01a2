"""Linear probe, MAE protocol: frozen encoder -> pooled features -> BatchNorm (no affine) -> linear.

LARS (momentum 0.9, trust 0.001, no weight decay), lr = blr * batch / 256 with blr 0.1, warm-up for
1/9 of the run (10 of the protocol's 90 epochs) then half-cycle cosine to 0, per iteration.

Two modes:
- `linear_probe` (protocol "linear"): the real thing. Every step augments the batch
  (RandomResizedCrop scale 0.08-1 + flip) and runs the frozen encoder on it; the evaluation view is
  the resized + center-cropped validation image that `build_eval_arrays` gives.
- `linear_probe_fast` (protocol "linear (fast, cached features)"): features of the un-augmented
  training images are extracted once and the same head is trained on that cache. Minutes instead of
  hours, and usually a little below the real protocol (no augmentation); label it as such.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import random_resized_crop_batch
from ..device import autocast_for, eval_mode
from ..errors import NonFiniteLoss
from ..lr_schedule import warmup_cosine
from .features import (
    Log,
    extract_features,
    feature_dim,
    module_device,
    pool_features,
)
from .lars import LARS

FAST_PROTOCOL = "linear (fast, cached features)"
FULL_PROTOCOL = "linear"
Arrays = tuple[torch.Tensor, torch.Tensor]


class LinearHead(nn.Module):
    """BatchNorm1d without affine parameters (it only whitens the feature scale, as in MAE) + linear."""

    def __init__(self, dim: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        # fork_rng: the head's init is reproducible and leaves the caller's RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(f))


def default_warmup(epochs: float) -> float:
    return min(10.0, epochs / 9.0)


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Percent of rows whose label is among the k highest logits (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.view(-1, 1)
    n = max(labels.numel(), 1)
    return [100.0 * hit[:, :min(k, kmax)].any(1).sum().item() / n for k in ks]


def num_classes_of(*label_sets: torch.Tensor) -> int:
    return int(max(int(y.max()) for y in label_sets if y.numel()) + 1)


def _epoch_batches(M: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """MAE drops the last partial batch; a set smaller than one batch is used whole, so that a
    few-hundred-image check still trains."""
    perm = torch.randperm(M, generator=gen)
    if M < batch_size:
        return [perm]
    return list(perm[: (M // batch_size) * batch_size].split(batch_size))


def lars_budget(epochs: float, steps_per_epoch: int, lr: float) -> float:
    """About how far, in multiples of its own norm, LARS can move the head over the run: each step
    moves a weight matrix by lr * 0.001 of its norm, momentum 0.9 multiplies that by up to 10.
    Linear in the number of images per epoch (lr grows with the batch, steps shrink with it), so
    the protocol, tuned on ImageNet's 1.28M images (budget ~500), under-trains small sets."""
    return epochs * steps_per_epoch * lr * 0.001 / (1 - 0.9)


def _fit_head(head, epochs, steps_per_epoch, epoch_batches, base_lr, warmup, log: Log, desc):
    budget = lars_budget(epochs, steps_per_epoch, base_lr)
    if log is not None and budget < 1:
        log(f"{desc}: warning: LARS can move the head by only ~{budget:.2g}x its norm in "
            f"{epochs} epochs of {steps_per_epoch} steps at lr {base_lr:.3g}; with this few images "
            f"the probe under-trains: raise --epochs or --blr")
    opt = LARS(head.parameters(), lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001)
    t0 = last = time.perf_counter()
    loss = None
    for epoch in range(epochs):
        head.train()
        for step, (f, y) in enumerate(epoch_batches(epoch)):
            lr = warmup_cosine(epoch + step / steps_per_epoch, base_lr, warmup, epochs)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(head(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        now = time.perf_counter()
        if log is not None and (now - last > 10 or epoch + 1 == epochs):
            log(f"{desc}: epoch {epoch + 1}/{epochs} loss {loss.item():.4f} ({now - t0:.0f}s)")
            last = now
    if loss is not None and not torch.isfinite(loss):
        raise NonFiniteLoss(f"{desc}: the probe's loss is {loss.item()}; lower --blr")
    return head


@torch.no_grad()
def _evaluate_head(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> list[float]:
    head.eval()
    logits = torch.cat([head(f) for f in feats.split(4096)]) if feats.shape[0] else feats
    return topk_accuracy(logits, labels.to(logits.device))


def _probe_head(protocol: str, batch: Callable[[torch.Tensor, torch.Generator], Arrays], dim: int,
                device: torch.device, train_labels: torch.Tensor, val_labels: torch.Tensor,
                val_features: Callable[[], torch.Tensor], *, num_classes: Optional[int], epochs: int,
                batch_size: int, blr: float, warmup_epochs: Optional[float], seed: int, log: Log, desc: str,
                t0: float) -> dict:
    """Fit a LinearHead on `batch(rows, gen)` (the (features, labels) of those training rows; `gen`
    draws the epoch order and any augmentation), evaluate it on `val_features()`, and return the
    result row."""
    M = train_labels.shape[0]
    C = num_classes or num_classes_of(train_labels, val_labels)
    bs = min(batch_size, M)
    lr = blr * bs / 256
    warmup = default_warmup(epochs) if warmup_epochs is None else warmup_epochs
    head = LinearHead(dim, C, seed).to(device)
    gen = torch.Generator().manual_seed(seed)

    def batches(_epoch):
        for idx in _epoch_batches(M, bs, gen):
            yield batch(idx, gen)

    steps = max(1, M // bs)
    _fit_head(head, epochs, steps, batches, lr, warmup, log, desc)
    fva = val_features()
    top1, top5 = _evaluate_head(head, fva, val_labels)
    return dict(protocol=protocol, top1=top1, top5=top5, epochs=epochs, feature_dim=dim,
                lr=lr, batch_size=bs, lars_budget=lars_budget(epochs, steps, lr), train_images=M,
                val_images=int(fva.shape[0]), num_classes=C, seconds=time.perf_counter() - t0)


def train_head_cached(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    num_classes: Optional[int] = None,
    epochs: int = 90,
    batch_size: int = 256,
    blr: float = 0.1,
    warmup_epochs: Optional[float] = None,
    seed: int = 0,
    log: Log = None,
    desc: str = "linear-fast",
) -> dict:
    """Train the probe head on fixed features (any device; the head follows the features)."""
    device = train_feats.device
    ytr = train_labels.to(device)

    def batch(idx: torch.Tensor, _gen: torch.Generator) -> Arrays:
        idx = idx.to(device)
        return train_feats[idx], ytr[idx]

    return _probe_head(FAST_PROTOCOL, batch, train_feats.shape[1], device, train_labels, val_labels,
                       lambda: val_feats, num_classes=num_classes, epochs=epochs, batch_size=batch_size, blr=blr,
                       warmup_epochs=warmup_epochs, seed=seed, log=log, desc=desc, t0=time.perf_counter())


def linear_probe_fast(
    encoder: nn.Module,
    train: Arrays,
    val: Arrays,
    *,
    epochs: int = 90,
    batch_size: int = 256,
    blr: float = 0.1,
    pool: str = "avg",
    seed: int = 0,
    num_classes: Optional[int] = None,
    log: Log = None,
    cached: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    desc: str = "linear-fast",
) -> dict:
    """Extract features once (or take `cached` = (train_feats, val_feats)) and train the head."""
    t0 = time.perf_counter()
    if cached is None:
        ftr = extract_features(encoder, train[0], batch_size=batch_size, pool=pool, log=log,
                               desc=f"{desc} train features")
        fva = extract_features(encoder, val[0], batch_size=batch_size, pool=pool, log=log,
                               desc=f"{desc} val features")
    else:
        ftr, fva = cached
    res = train_head_cached(ftr, train[1], fva, val[1], num_classes=num_classes, epochs=epochs,
                            batch_size=batch_size, blr=blr, seed=seed, log=log, desc=desc)
    res["seconds"] = time.perf_counter() - t0
    return res


def linear_probe(
    encoder: nn.Module,
    train: Arrays,
    val: Arrays,
    *,
    epochs: int = 90,
    batch_size: int = 256,
    blr: float = 0.1,
    pool: str = "avg",
    seed: int = 0,
    num_classes: Optional[int] = None,
    min_crop_scale: float = 0.08,
    log: Log = None,
    desc: str = "linear",
) -> dict:
    """The full protocol: augmented batches through the frozen encoder at every step."""
    t0 = time.perf_counter()
    device = module_device(encoder)
    images, labels = train
    pin = device.type == "cuda" and not images.is_cuda

    def batch(idx: torch.Tensor, gen: torch.Generator) -> Arrays:
        xb = images[idx]
        if pin:
            xb = xb.pin_memory()
        xb = random_resized_crop_batch(xb.to(device, non_blocking=True), xb.shape[-1],
                                       (min_crop_scale, 1.0), True, gen)
        with torch.no_grad(), autocast_for(device):
            f = pool_features(encoder, xb, pool).float()
        return f, labels[idx].to(device, non_blocking=True)

    def val_features() -> torch.Tensor:
        return extract_features(encoder, val[0], batch_size=batch_size, pool=pool, log=log,
                                desc=f"{desc} val features")

    # eval_mode: the frozen encoder's dropout / drop path stay off while the head trains.
    with eval_mode(encoder):
        return _probe_head(FULL_PROTOCOL, batch, feature_dim(encoder), device, labels, val[1], val_features,
                           num_classes=num_classes, epochs=epochs, batch_size=batch_size, blr=blr,
                           warmup_epochs=None, seed=seed, log=log, desc=desc, t0=t0)


def quick_probe(
    encoder: nn.Module,
    train_arrays: Arrays,
    val_arrays: Arrays,
    epochs: int,
    batch_size: int,
    blr: float,
    *,
    pool: str = "avg",
    log: Log = None,
) -> dict:
    """Fast-mode probe for the trainer's end-of-demo line: {'top1', 'top5'} in percent."""
    res = linear_probe_fast(encoder, train_arrays, val_arrays, epochs=epochs, batch_size=batch_size,
                            blr=blr, pool=pool, log=log)
    return dict(top1=res["top1"], top5=res["top5"])
