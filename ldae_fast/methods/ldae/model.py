"""l-DAE's network: the shared ViT encoder and decoder (models/vit.py) joined as one
encoder-decoder in one of two layouts (ldae.layout; docs/model.md), its builder and its analytic
FLOP and parameter counts.

The state_dict names are `encoder.*` and `decoder.*`, the shared halves' own (timm's
VisionTransformer names in the encoder, see models/timm_export.py), so checkpoints and timm
exports keep loading wherever this class lives.
"""

from __future__ import annotations

import torch

from ...config import ModelConfig
from ...markers import nvtx_range
from ...models.blocks import mlp_hidden
from ...models.speed import apply_speed_switches
from ...models.vit import SIGMA_FREQ_DIM, EncoderDecoder, ViTDecoder, ViTEncoder
from .config import LDAEConfig, cond_width


class LDAEModel(EncoderDecoder):
    """x_in (B, C, H, W) noisy image + conditioning -> x_hat (B, C, H, W) predicted clean image.

    The conditioning comes as keyword arguments, DiT's model_kwargs: the method builds the dict
    (`model(x_in, **cond)`), so a new kind (a class label) is a key, not a new signature.
    """

    def forward(self, x_in: torch.Tensor, sigma: torch.Tensor | None = None, labels=None,
                **cond) -> torch.Tensor:
        """sigma: (B,) noise levels (None: clean input); labels: (B,) classes, the null class
        (num_classes) where dropped, None for all-null (class-conditional models only)."""
        if cond:
            raise ValueError(f"LDAEModel has no conditioning on {', '.join(sorted(cond))} "
                             "(it takes sigma and labels)")
        # Phase markers for Nsight / the profiler (no-ops without CUDA or a running profiler).
        if self.encoder.layout == "dit":
            with nvtx_range("encoder"):
                tokens, c = self.encoder.encode(x_in, sigma, labels)
            with nvtx_range("decoder"):
                return self.decoder(tokens, c=c)
        with nvtx_range("encoder"):
            tokens = self.encoder.forward_features(x_in, sigma, labels)
        with nvtx_range("decoder"):
            return self.decoder(tokens, sigma, labels)


def _dims(cfg: ModelConfig, net: LDAEConfig, kernels: str) -> dict:
    return dict(width=cfg.width, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, cond=net.cond,
                attn_backend=cfg.attn_backend, fused_adaln=cfg.fused_adaln, kernels=kernels,
                num_classes=cfg.num_classes if net.class_cond else 0, layout=net.layout,
                cond_dim=cond_width(cfg.width, net))


def build_encoder(cfg: ModelConfig, net: LDAEConfig, img_size: int, in_chans: int = 3,
                  kernels: str = "auto") -> ViTEncoder:
    return ViTEncoder(img_size, cfg.patch_size, in_chans, depth=cfg.encoder_depth,
                      latent_in=cfg.latent_dim if net.input == "latent" else 0, **_dims(cfg, net, kernels))


def build_model(cfg: ModelConfig, net: LDAEConfig, img_size: int, in_chans: int = 3,
                kernels: str = "auto") -> LDAEModel:
    """l-DAE's encoder-decoder from the shared model section `cfg` and l-DAE's own `net` (its
    layout and conditioning width), for square img_size x img_size inputs with in_chans channels.
    `kernels` is engine.kernels: with model.fused_adaln it decides where the fused kernel runs."""
    if img_size % cfg.patch_size:
        raise ValueError(f"img_size={img_size} is not divisible by model.patch_size={cfg.patch_size}")
    if cond_width(cfg.width, net) < 1:
        raise ValueError(f"ldae.adaln_dim={net.adaln_dim}: width/4 is 0 for model.width={cfg.width}")
    enc = build_encoder(cfg, net, img_size, in_chans, kernels)
    dec = ViTDecoder(img_size, cfg.patch_size, in_chans, depth=cfg.decoder_depth,
                     latent_out=cfg.latent_dim if net.output == "latent" else 0, **_dims(cfg, net, kernels))
    model = LDAEModel(enc, dec)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return apply_speed_switches(model, cfg.bf16_residual, cfg.adaln_act_dtype, cfg.fp8)


def flops_per_image(cfg: ModelConfig, net: LDAEConfig, img_size: int, in_chans: int = 3) -> float:
    """Analytic forward FLOPs of one image through LDAEModel (multiply-add = 2 FLOPs).

    Counts every matmul/conv, nothing element-wise (norms, softmax, GELU, residuals, modulation):
    with N patches, T tokens (N + 1 with layout 'mae''s class token, N with 'dit'), width w, MLP
    hidden h, L = encoder + decoder blocks, D = p*p*C, a = cond_width (width of c):
      blocks        L * [2 T w (3w + w + 2h) + 4 T^2 w]   (= L T (24 w^2 + 4 T w) when h = 4w):
                    qkv, attention output projection, MLP; q k^T and attn @ v
      patch embed   2 N (p^2 C) w
      decoder embed 2 T w^2 (layout 'mae' only)
      head          2 N w D
      adaLN only    per image, not per token: 2 L a (6w) block modulation, 2 a (2w) final
                    modulation, E x 2 (256 a + a^2) for the sigma embedders (E = 2 with 'mae',
                    one per half; 1 with 'dit').
    Backward is about 2x forward, so a training step is ~3x this (plus one more forward of the
    blocks with gradient checkpointing). Each method's count: its MethodSpec.train_flops.
    """
    p, w = cfg.patch_size, cfg.width
    mae = net.layout == "mae"
    N = (img_size // p) ** 2
    T = N + 1 if mae else N
    h = mlp_hidden(w, cfg.mlp_ratio)
    L = cfg.encoder_depth + cfg.decoder_depth
    D_in, D = _io_dims(cfg, net, in_chans)
    flops = L * (2 * T * w * (3 * w + w + 2 * h) + 4 * T * T * w)
    flops += 2 * N * D_in * w + 2 * N * w * D
    if mae:
        flops += 2 * T * w * w
    if net.cond == "adaln":
        a = cond_width(w, net)
        flops += 2 * L * a * 6 * w + 2 * a * 2 * w + (2 if mae else 1) * 2 * (SIGMA_FREQ_DIM * a + a * a)
    return float(flops)


def _io_dims(cfg: ModelConfig, net: LDAEConfig, in_chans: int) -> tuple[int, int]:
    """Per-token input and output widths: C p^2 for images, d for latent tokens."""
    D = cfg.patch_size**2 * in_chans
    return (cfg.latent_dim if net.input == "latent" else D), (cfg.latent_dim if net.output == "latent" else D)


def param_count(cfg: ModelConfig, net: LDAEConfig, img_size: int, in_chans: int = 3) -> dict[str, int]:
    """Analytic parameter counts {'encoder', 'decoder', 'total'} (fixed position embeddings excluded)
    of l-DAE's network.

    Per block: qkv, proj, fc1, fc2, plus the adaLN modulation Linear(a, 6w) (a = cond_width)
    or, with cond='none', two affine LayerNorms. Layout 'mae' adds a class token and the final
    LayerNorm to the encoder, the decoder embedding and a second sigma embedder (and label
    embedding) to the decoder; 'dit' has one sigma embedder (and label embedding), in the encoder.
    """
    w, a = cfg.width, cond_width(cfg.width, net)
    h = mlp_hidden(w, cfg.mlp_ratio)
    adaln = net.cond == "adaln"
    mae = net.layout == "mae"
    block = (3 * w * w + 3 * w) + (w * w + w) + (w * h + h) + (h * w + w)
    block += (a * 6 * w + 6 * w) if adaln else 4 * w
    sigma_embed = (SIGMA_FREQ_DIM * a + a + a * a + a) if adaln else 0
    label_embed = (cfg.num_classes + 1) * a if net.class_cond else 0
    D_in, D = _io_dims(cfg, net, in_chans)
    enc = (D_in * w + w) + cfg.encoder_depth * block + sigma_embed + label_embed
    dec = cfg.decoder_depth * block + (w * D + D)
    dec += (a * 2 * w + 2 * w) if adaln else 2 * w
    if mae:
        enc += w + 2 * w  # class token, final LayerNorm
        dec += (w * w + w) + sigma_embed + label_embed  # decoder embedding, its own embedders
    return {"encoder": enc, "decoder": dec, "total": enc + dec}


__all__ = ["LDAEModel", "build_encoder", "build_model", "flops_per_image", "param_count"]
