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
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import random_resized_crop_batch
from ..device import autocast_for, eval_mode
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
        raise FloatingPointError(f"{desc}: the probe's loss is {loss.item()}; lower --blr")
    return head


@torch.no_grad()
def _evaluate_head(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> list[float]:
    head.eval()
    logits = torch.cat([head(f) for f in feats.split(4096)]) if feats.shape[0] else feats
    return topk_accuracy(logits, labels.to(logits.device))


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
    M, dim = train_feats.shape
    C = num_classes or num_classes_of(train_labels, val_labels)
    bs = min(batch_size, M)
    lr = blr * bs / 256
    warmup = default_warmup(epochs) if warmup_epochs is None else warmup_epochs
    head = LinearHead(dim, C, seed).to(device)
    ytr = train_labels.to(device)
    gen = torch.Generator().manual_seed(seed)

    def batches(_epoch):
        for idx in _epoch_batches(M, bs, gen):
            idx = idx.to(device)
            yield train_feats[idx], ytr[idx]

    steps = max(1, M // bs)
    t0 = time.perf_counter()
    _fit_head(head, epochs, steps, batches, lr, warmup, log, desc)
    top1, top5 = _evaluate_head(head, val_feats, val_labels)
    return dict(protocol=FAST_PROTOCOL, top1=top1, top5=top5, epochs=epochs, feature_dim=dim,
                lr=lr, batch_size=bs, lars_budget=lars_budget(epochs, steps, lr), train_images=M,
                val_images=int(val_feats.shape[0]),
                num_classes=C, seconds=time.perf_counter() - t0)


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
    M = images.shape[0]
    C = num_classes or num_classes_of(labels, val[1])
    bs = min(batch_size, M)
    lr = blr * bs / 256
    dim = feature_dim(encoder)
    head = LinearHead(dim, C, seed).to(device)
    gen = torch.Generator().manual_seed(seed)
    pin = device.type == "cuda" and not images.is_cuda

    def batches(_epoch):
        for idx in _epoch_batches(M, bs, gen):
            xb = images[idx]
            if pin:
                xb = xb.pin_memory()
            xb = random_resized_crop_batch(xb.to(device, non_blocking=True), xb.shape[-1],
                                           (min_crop_scale, 1.0), True, gen)
            with torch.no_grad(), autocast_for(device):
                f = pool_features(encoder, xb, pool).float()
            yield f, labels[idx].to(device, non_blocking=True)

    steps = max(1, M // bs)
    with eval_mode(encoder):
        _fit_head(head, epochs, steps, batches, lr, default_warmup(epochs), log, desc)
    fva = extract_features(encoder, val[0], batch_size=batch_size, pool=pool, log=log,
                           desc=f"{desc} val features")
    top1, top5 = _evaluate_head(head, fva, val[1])
    return dict(protocol=FULL_PROTOCOL, top1=top1, top5=top5, epochs=epochs, feature_dim=dim,
                lr=lr, batch_size=bs, lars_budget=lars_budget(epochs, steps, lr), train_images=M,
                val_images=int(val[0].shape[0]),
                num_classes=C, seconds=time.perf_counter() - t0)


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
