"""l-DAE's probe view: the encoder conditioned on a fixed noise level (l-DAE App. A: t = 10 of
1000), fed the clean image or the image noised at that level through the tokenizer; and what the
probe reads at depth k (`probe_encoder`): past the encoder only in the 'dit' layout (DitPrefix)."""

from __future__ import annotations

import torch
from torch import nn

from ..probe import ProbeView, feature_dim, pooled_at_depths
from . import schedules
from .schedules import gamma_for_sigma


def probe_sigma(cfg) -> float:
    """The noise level the probe conditions on: eval.probe_sigma when given, else noise.schedule's
    sigma at step eval.probe_t of noise.num_timesteps (l-DAE App. A: t = 10 of 1000)."""
    e, n = cfg.eval, cfg.noise
    if e.probe_sigma >= 0:
        return float(e.probe_sigma)
    t = torch.tensor([e.probe_t / n.num_timesteps], dtype=torch.float64)
    _, sigma = schedules.gamma_sigma(t, n.schedule, n.sigma_max, n.num_timesteps, n.single_sigma)
    return float(sigma[0])


def probe_note(cfg) -> str:
    e = cfg.eval
    return (f"sigma {probe_sigma(cfg):.4g} (eval.probe_t={e.probe_t}"
            + (f", probe_sigma={e.probe_sigma:g}" if e.probe_sigma >= 0 else "")
            + f"), {e.probe_input} input, depth {e.probe_depth or 'all'}")


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
            raise ValueError("an encoder fed latent tokens (ldae.input='latent') needs the checkpoint's "
                             "method (tokenizer) to be probed")
        md = method.device

        def tok(x):
            return method.tokens(x.to(md)).to(x.device)
    fn, gamma = None, 1.0
    if noisy:
        if method is None:
            raise ValueError("eval.probe_input='noisy' needs the checkpoint's method (tokenizer); "
                             "this encoder has none")
        gamma = gamma_for_sigma(sigma, cfg.noise.schedule)
        md = method.device

        def fn(x, g, s, step):
            return method.noisy_input(x.to(md), g.to(md), s.to(md), step).to(x.device)
    return ProbeView(encoder, sigma, e.probe_depth, fn, gamma, tok)


# l-DAE App. A (../shared/PAPERS.md): ImageNet linear-probe top-1 of DiT-L (24 blocks, the first
# 12 the encoder) after 400 epochs, probed after k blocks and conditioned on t of 1000 steps.
# The depth sweep is at t = 10 with clean input; the t sweep at the encoder's 12 blocks.
APP_A_DEPTH = {9: 58.5, 10: 62.0, 11: 64.1, 12: 64.5, 13: 63.6, 14: 61.9, 15: 59.7}
APP_A_T = {"clean": {0: 64.1, 10: 64.5, 20: 64.1, 40: 63.3, 80: 62.2},
           "noisy": {0: 64.2, 10: 65.0, 20: 65.0, 40: 65.0, 80: 64.5}}


def paper_probe_sweep(cfg) -> dict:
    """The App. A numbers by (k, t, input) in this config's terms (k counts blocks from the
    encoder's first; 0 is the encoder's 12), and whether cfg is the network they were measured on
    (DiT-L cut at 12 blocks, 256 px, t of 1000 steps); the training (400 ImageNet epochs) the
    config cannot tell."""
    m = cfg.model
    top1 = {(k, 10, "clean"): a for k, a in APP_A_DEPTH.items()}
    for inp, row in APP_A_T.items():
        top1.update({(12, t, inp): a for t, a in row.items()})
    if m.encoder_depth == 12:
        top1.update({(0, t, inp): a for (k, t, inp), a in list(top1.items()) if k == 12})
    matches = (m.width == 1024 and m.encoder_depth == 12 and m.decoder_depth == 12 and cfg.ldae.layout == "dit"
               and m.patch_size == 16 and cfg.data.img_size == 256 and cfg.noise.num_timesteps == 1000)
    return dict(source="l-DAE App. A: DiT-L (encoder = its first 12 blocks), ImageNet, 400 epochs, "
                       "256 px", matches=matches, top1=top1)


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
        from ...models.vit import _run_blocks

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
    """l-DAE's MethodSpec.probe_encoder: what the probe reads of `model` at eval.probe_depth: its encoder, or, with ldae.layout
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
