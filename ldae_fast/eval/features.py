"""Frozen-encoder features in batches: eval mode, no autograd, bf16 autocast on CUDA."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch import nn

from ..device import autocast_dtype, autocast_for, eval_mode

POOLS = ("avg", "cls")
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


def pool_features(encoder: nn.Module, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """(B, C, H, W) images -> (B, F) features. The encoder's own `pooled` decides where its final
    norm sits and which tokens it averages (the l-DAE 'dit' layout has no class token: all of
    them); modules without one get the MAE convention (mean over the tokens after
    `num_prefix_tokens`, default 1, the class token)."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}; choose one of {', '.join(POOLS)}")
    if hasattr(encoder, "pooled"):
        return encoder.pooled(x, pool=pool)
    tokens = encoder.forward_features(x)
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    if pool == "cls" and prefix == 0:
        raise ValueError("pool='cls' needs a class token; this encoder has none (use pool='avg')")
    return tokens[:, 0] if pool == "cls" else tokens[:, prefix:].mean(1)


def feature_dim(encoder: nn.Module) -> int:
    return int(getattr(encoder, "num_features", 0) or getattr(encoder, "embed_dim", 0))


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
    """The noise level the probe conditions on: eval.probe_sigma when given, else noise.schedule's
    sigma at step eval.probe_t of noise.num_timesteps (l-DAE App. A: t = 10 of 1000)."""
    e, n = cfg.eval, cfg.noise
    if e.probe_sigma >= 0:
        return float(e.probe_sigma)
    from ldae_fast import schedules

    t = torch.tensor([e.probe_t / n.num_timesteps], dtype=torch.float64)
    _, sigma = schedules.gamma_sigma(t, n.schedule, n.sigma_max, n.num_timesteps, n.single_sigma)
    return float(sigma[0])


class ProbeView(nn.Module):
    """An encoder as the probe sees it: conditioned on a fixed sigma, cut after `depth` blocks
    (0: all), fed either the clean image or the image noised at that level by `noisy_input`
    (the method's training noise, a fixed draw per batch position)."""

    def __init__(self, encoder: nn.Module, sigma: float = 0.0, depth: int = 0,
                 noisy_input: Optional[Callable] = None, gamma: float = 1.0,
                 tokens: Optional[Callable] = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.sigma, self.depth, self.gamma = float(sigma), int(depth), float(gamma)
        self.noisy_input = noisy_input
        self.tokens = tokens
        """Clean images -> latent tokens, for an encoder fed latent tokens (model.input='latent')."""
        self.num_features = feature_dim(encoder)
        self._calls = 0

    def pooled(self, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        B = x.shape[0]
        if self.noisy_input is not None:
            g = torch.full((B,), self.gamma, device=x.device)
            s = torch.full((B,), self.sigma, device=x.device)
            x = self.noisy_input(x.float(), g, s, self._calls).to(x.dtype)
            self._calls += 1
        elif self.tokens is not None:
            x = self.tokens(x.float()).to(x.dtype)
        if not hasattr(self.encoder, "pooled"):
            return pool_features(self.encoder, x, pool)
        kw = {}
        if self.sigma:
            kw["sigma"] = self.sigma
        if self.depth:
            kw["depth"] = self.depth
        return self.encoder.pooled(x, pool=pool, **kw)


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


def probe_encoder(model: nn.Module, cfg) -> nn.Module:
    """What the probe reads of `model` at eval.probe_depth: its encoder, or, with model.layout
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
    """`encoder` wrapped with the config's probe settings (eval.probe_t / probe_sigma /
    probe_input / probe_depth); the bare encoder when they ask for nothing (sigma 0, clean, all
    blocks). A noisy probe needs the method (its tokenizer and noise)."""
    e = cfg.eval
    sigma = probe_sigma(cfg)
    noisy = e.probe_input == "noisy" and sigma > 0
    latent = getattr(encoder, "latent_in", 0) > 0
    if sigma == 0 and not e.probe_depth and not noisy and not latent:
        return encoder
    tok = None
    if latent:
        if method is None:
            raise ValueError("an encoder fed latent tokens (model.input='latent') needs the checkpoint's "
                             "method (tokenizer) to be probed")
        md = method.device

        def tok(x):
            return method.tokens(x.to(md)).to(x.device)
    fn, gamma = None, 1.0
    if noisy:
        if method is None:
            raise ValueError("eval.probe_input='noisy' needs the checkpoint's method (tokenizer); "
                             "this encoder has none")
        from ldae_fast.objectives.sampling import gamma_for_sigma

        gamma = gamma_for_sigma(sigma, cfg.noise.schedule)
        md = method.device

        def fn(x, g, s, step):
            return method.noisy_input(x.to(md), g.to(md), s.to(md), step).to(x.device)
    return ProbeView(encoder, sigma, e.probe_depth, fn, gamma, tok)
