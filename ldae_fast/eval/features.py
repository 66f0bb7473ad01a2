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


class DitPrefix(nn.Module):
    """A 'dit' l-DAE network read after its first k blocks where k passes the encoder / decoder
    cut: the encoder's blocks, then the decoder's first `blocks` on the same tokens with the same
    conditioning c. The two halves are one DiT there (no norm or embedding between them), so this
    is the paper's probe at block k of DiT-L's 24 (l-DAE App. A: k = 9..15). Features: the mean of
    all tokens, as the encoder's own."""

    def __init__(self, encoder: nn.Module, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.encoder, self.blocks = encoder, blocks
        self.num_features = feature_dim(encoder)
        self.latent_in = getattr(encoder, "latent_in", 0)
        self.num_prefix_tokens = 0

    def pooled(self, x: torch.Tensor, pool: str = "avg", sigma=None, depth: int = 0) -> torch.Tensor:
        # `depth` is the one this view was built for (ProbeView passes it on).
        from ldae_fast.models.vit import _run_blocks

        if pool != "avg":
            raise ValueError(f"pool={pool!r}: the 'dit' layout has no class token (use pool='avg')")
        tokens, c = self.encoder.encode(x, sigma)
        return _run_blocks(self.blocks, tokens, c).mean(dim=1)

    def pooled_depths(self, x: torch.Tensor, depths, pool: str = "avg", sigma=None) -> list[torch.Tensor]:
        """Features after each of `depths` blocks, counted over the encoder's and then the
        decoder's, from one forward."""
        if pool != "avg":
            raise ValueError(f"pool={pool!r}: the 'dit' layout has no class token (use pool='avg')")
        return pooled_at_depths(self.encoder, x, depths, pool, sigma, more_blocks=self.blocks)


def probe_encoder(model: nn.Module, cfg) -> nn.Module:
    """What the probe reads of `model` at eval.probe_depth: its encoder, or, with ldae.layout
    'dit' and a depth past the encoder's blocks, the encoder continued through the decoder's
    first blocks (DitPrefix). A depth past what the network has is an error, never a silent
    'all blocks'."""
    enc = model.encoder
    k, n = int(cfg.eval.probe_depth), len(enc.blocks)
    if k <= n:
        return enc
    dec = getattr(model, "decoder", None)
    if getattr(enc, "layout", "mae") != "dit" or dec is None or k > n + len(dec.blocks):
        room = (n + len(dec.blocks)) if (dec is not None and getattr(enc, "layout", "") == "dit") else n
        raise ValueError(f"eval.probe_depth={k}: this network has {room} blocks to probe (0: all encoder "
                         f"blocks); only the 'dit' layout continues past the encoder's {n}")
    return DitPrefix(enc, dec.blocks[: k - n])


def probe_view(encoder: nn.Module, cfg, method=None) -> nn.Module:
    """`encoder` as the probe of cfg's method reads it (methods registry: MethodSpec.probe_view):
    the bare encoder when the eval settings ask for nothing more."""
    from ..methods import spec_for

    return spec_for(cfg).probe_view(encoder, cfg, method)


def probe_note(cfg) -> str:
    """What the probe conditions on, for the log (MethodSpec.probe_note)."""
    from ..methods import spec_for

    return spec_for(cfg).probe_note(cfg)
