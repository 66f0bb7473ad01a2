"""Frozen-encoder features in batches: eval mode, no autograd, bf16 autocast on CUDA."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

import torch
from torch import nn

POOLS = ("avg", "cls")
Log = Optional[Callable[[str], None]]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    return torch.device(name)


def module_device(m: nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


def autocast_for(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA (the encoder trains that way); fp32 elsewhere, where CPU bf16
    matmuls are slower than fp32 and would only add noise to the numbers."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def pool_features(encoder: nn.Module, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """(B, C, H, W) images -> (B, F) features. The encoder's own `pooled` decides where its final
    norm sits; modules without one get the MAE convention (mean over patch tokens, no class token)."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}; choose one of {', '.join(POOLS)}")
    if hasattr(encoder, "pooled"):
        return encoder.pooled(x, pool=pool)
    tokens = encoder.forward_features(x)
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)


def feature_dim(encoder: nn.Module) -> int:
    return int(getattr(encoder, "num_features", 0) or getattr(encoder, "embed_dim", 0))


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Eval mode for the duration, then the caller's mode back (the trainer calls us mid-run)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    pool: str = "avg",
    precision: str = "auto",
    log: Log = None,
    desc: str = "features",
) -> torch.Tensor:
    """Features (M, F) float32, on the encoder's device, in the order of `images`.

    `images` stays where it is (usually host memory); only one batch at a time is moved.
    """
    device = module_device(encoder)
    M = images.shape[0]
    out: list[torch.Tensor] = []
    t0 = last = time.perf_counter()
    pin = device.type == "cuda" and not images.is_cuda
    with frozen(encoder):
        for start in range(0, M, batch_size):
            xb = images[start:start + batch_size]
            if pin:
                xb = xb.pin_memory()
            xb = xb.to(device, non_blocking=True)
            with autocast_for(device, precision):
                f = pool_features(encoder, xb, pool)
            out.append(f.float())
            now = time.perf_counter()
            if log is not None and now - last > 10:
                done = min(start + batch_size, M)
                log(f"{desc}: {done}/{M} images, {done / (now - t0):.0f} img/s")
                last = now
    if not out:
        return torch.zeros(0, feature_dim(encoder), device=device)
    return torch.cat(out)
