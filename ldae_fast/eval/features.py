"""Frozen-encoder features in batches: eval mode, no autograd, bf16 autocast on CUDA."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch import nn

from ..device import autocast_dtype, autocast_for, eval_mode
from ..methods.probe import POOLS, ProbeView, feature_dim, pool_features, pooled_at_depths  # noqa: F401 (re-exported)

Log = Optional[Callable[[str], None]]


def module_device(m: nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


def feature_settings(device: torch.device, precision: str = "auto") -> str:
    """How extract_features computes on `device`, in words, for every output that prints a probe
    number: the same weights give a point or two apart in bf16 and in fp32."""
    bf16 = autocast_dtype(precision, device) is not None
    return f"features on {device.type} in {'bf16 autocast' if bf16 else 'fp32'}"


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
    with eval_mode(encoder):
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


def probe_sigma(cfg) -> float:
    """The noise level the probe conditions on (MethodSpec.probe_sigma; 0 for a method whose
    encoder takes none)."""
    from ..methods import spec_for

    return spec_for(cfg).probe_sigma(cfg)


def probe_encoder(model: nn.Module, cfg) -> nn.Module:
    """What the probe reads of `model` at eval.probe_depth (methods registry:
    MethodSpec.probe_encoder): the encoder, or the method's own reading past it. A depth past what
    the network has is an error, never a silent 'all blocks'."""
    from ..methods import spec_for

    return spec_for(cfg).probe_encoder(model, cfg)


def probe_view(encoder: nn.Module, cfg, method=None) -> nn.Module:
    """`encoder` as the probe of cfg's method reads it (methods registry: MethodSpec.probe_view):
    the bare encoder when the eval settings ask for nothing more."""
    from ..methods import spec_for

    return spec_for(cfg).probe_view(encoder, cfg, method)


def probe_note(cfg) -> str:
    """What the probe conditions on, for the log (MethodSpec.probe_note)."""
    from ..methods import spec_for

    return spec_for(cfg).probe_note(cfg)
