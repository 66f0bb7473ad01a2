"""Export the l-DAE encoder as a timm VisionTransformer (names, weights and constructor arguments).

    import timm
    m = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_kwargs(encoder))
    m.load_state_dict(timm_state_dict(encoder), strict=True)
    # m.forward_features(x) == encoder.forward_features(x, sigma=0)

With cond='adaln' the encoder's blocks are modulated by a function of sigma. For a fixed sigma
(0: clean images, what evaluation feeds) the modulation is a constant per block, and folds exactly
into plain ViT parameters:
    LayerNorm_noaffine(x) * (1 + scale) + shift   ->  LayerNorm with weight 1 + scale, bias shift
    gate * (h W^T + b)                            ->  Linear with weight diag(gate) W, bias gate * b
so the exported model is an ordinary timm ViT with no trace of the conditioning.

Layout 'dit' (no class token, no final norm) exports as timm's class_token=False,
global_pool='avg', final_norm=False, fc_norm=False: forward_features gives the N patch tokens as
our encoder does, and the pooled feature is their mean, the l-DAE probe's. The export is the
pretrained encoder only; fine-tuning (eval/finetune.py) adds MAE's fresh fc_norm after the pool.

`timm_config` is the `config.json` of timm's local-dir layout, so that an export directory holding
it and `model.safetensors` loads with `timm.create_model('local-dir:PATH', pretrained=True)` alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .vit import ViTEncoder


def timm_kwargs(encoder: ViTEncoder, global_pool: str = "avg") -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model('vit_base_patch16_224', pretrained=False, **kw)``.

    global_pool: 'avg' (mean of the patch tokens after the final norm, MAE's linear-probe
    feature; ``fc_norm=False`` keeps the norm where our encoder has it, under the name ``norm``)
    or 'token' (the class token; layout 'mae' only). The head is left out (num_classes=0): the
    caller adds its own.
    """
    if global_pool not in ("avg", "token"):
        raise ValueError(f"global_pool={global_pool!r}; choose 'avg' or 'token'")
    has_cls = encoder.cls_token is not None
    if global_pool == "token" and not has_cls:
        raise ValueError(f"global_pool='token' needs a class token; ldae.layout={encoder.layout!r} has "
                         "none (use 'avg')")
    kw = dict(
        img_size=encoder.img_size,
        patch_size=encoder.patch_size,
        in_chans=encoder.in_chans,
        embed_dim=encoder.embed_dim,
        depth=encoder.depth,
        num_heads=encoder.num_heads,
        mlp_ratio=encoder.mlp_ratio,
        qkv_bias=True,
        class_token=has_cls,
        no_embed_class=False,
        num_classes=0,
        global_pool=global_pool,
        fc_norm=False,
        # A string, so the kwargs stay JSON-serialisable for an exported config.
        act_layer="gelu_tanh",
    )
    if isinstance(encoder.norm, torch.nn.Identity):
        # Only when needed, so a 'mae' export's kwargs stay what older timm versions accept.
        kw["final_norm"] = False
    return kw


# The timm architecture the kwargs specialise; any ViT name works, the kwargs define the shape.
TIMM_ARCH = "vit_base_patch16_224"
# The weights file of an export directory: the name timm's local-dir loader looks for first.
WEIGHTS_FILE = "model.safetensors"


def timm_config(encoder: ViTEncoder, global_pool: str = "avg") -> dict[str, Any]:
    """timm's `config.json` for the encoder: the constructor arguments plus the pretrained_cfg
    that timm's data helpers (`resolve_data_config`, `create_transform`) read.

    Without it timm falls back to the architecture's defaults (224 px, mean/std 0.5), which are
    not what the encoder was trained on; mean/std, resolution and crop follow our data pipeline.
    """
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize_size

    kwargs = timm_kwargs(encoder, global_pool)
    size = int(encoder.img_size)
    return {
        "architecture": TIMM_ARCH,
        "num_classes": 0,
        "num_features": int(encoder.embed_dim),
        "global_pool": global_pool,
        "model_args": kwargs,
        "pretrained_cfg": {
            "tag": "ldae",
            "custom_load": False,
            "input_size": [int(encoder.in_chans), size, size],
            # Position embeddings are learnt for this grid; timm may still resample them on request.
            "fixed_input_size": True,
            "interpolation": "bilinear",
            "crop_pct": size / eval_resize_size(size),
            "crop_mode": "center",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def _block_modulations(encoder: ViTEncoder, sigma: float) -> list[tuple[torch.Tensor, ...]] | None:
    """Per block (shift1, scale1, gate1, shift2, scale2, gate2) at a constant sigma, in float64."""
    if encoder.sigma_embed is None:
        return None
    emb = encoder.sigma_embed
    ref = encoder.patch_embed.proj.weight
    freqs = emb.frequencies(torch.full((1,), float(sigma), device=ref.device)).double()
    lin1, lin2 = emb.mlp[0], emb.mlp[2]
    c = F.linear(F.silu(F.linear(freqs, lin1.weight.double(), lin1.bias.double())),
                 lin2.weight.double(), lin2.bias.double())
    if getattr(encoder, "label_embed", None) is not None:
        # A class-conditional encoder is evaluated on the null class (no label at test time).
        c = c + encoder.label_embed.table.weight[-1:].double()
    out = []
    for blk in encoder.blocks:
        lin = blk.adaLN_modulation[-1]
        mod = F.linear(F.silu(c), lin.weight.double(), lin.bias.double())[0]
        out.append(mod.chunk(6))
    return out


@torch.no_grad()
def timm_state_dict(encoder: ViTEncoder, sigma: float = 0.0) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm's VisionTransformer names, conditioning folded at sigma.

    Tensors are fresh contiguous copies (safe for safetensors) in the encoder's dtype and device.
    """
    if getattr(encoder, "latent_in", 0):
        raise ValueError("this encoder is fed latent tokens (ldae.input='latent'), not images: it has no "
                         "timm VisionTransformer form")
    dtype = encoder.patch_embed.proj.weight.dtype
    sd: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        sd[name] = t.detach().to(dtype).clone().contiguous()

    if encoder.cls_token is not None:
        put("cls_token", encoder.cls_token)
    put("pos_embed", encoder.pos_embed)
    put("patch_embed.proj.weight", encoder.patch_embed.proj.weight)
    put("patch_embed.proj.bias", encoder.patch_embed.proj.bias)
    mods = _block_modulations(encoder, sigma)
    for i, blk in enumerate(encoder.blocks):
        pre = f"blocks.{i}."
        put(pre + "attn.qkv.weight", blk.attn.qkv.weight)
        put(pre + "attn.qkv.bias", blk.attn.qkv.bias)
        put(pre + "mlp.fc1.weight", blk.mlp.fc1.weight)
        put(pre + "mlp.fc1.bias", blk.mlp.fc1.bias)
        if mods is None:
            for name in ("norm1", "norm2"):
                norm = getattr(blk, name)
                put(pre + name + ".weight", norm.weight)
                put(pre + name + ".bias", norm.bias)
            for name in ("attn.proj", "mlp.fc2"):
                lin = blk.get_submodule(name)
                put(pre + name + ".weight", lin.weight)
                put(pre + name + ".bias", lin.bias)
            continue
        sh1, sc1, g1, sh2, sc2, g2 = mods[i]
        for name, shift, scale in (("norm1", sh1, sc1), ("norm2", sh2, sc2)):
            put(pre + name + ".weight", 1.0 + scale)
            put(pre + name + ".bias", shift)
        for name, gate in (("attn.proj", g1), ("mlp.fc2", g2)):
            lin = blk.get_submodule(name)
            put(pre + name + ".weight", gate.unsqueeze(1) * lin.weight.double())
            put(pre + name + ".bias", gate * lin.bias.double())
    if not isinstance(encoder.norm, torch.nn.Identity):
        put("norm.weight", encoder.norm.weight)
        put("norm.bias", encoder.norm.bias)
    return sd


def to_timm(encoder: ViTEncoder, global_pool: str = "avg", sigma: float = 0.0):
    """A timm VisionTransformer holding the encoder's weights (no download: pretrained=False)."""
    try:
        import timm
    except ImportError as e:  # timm is a dependency, but keep the failure readable
        raise ImportError("exporting to timm needs timm: `pip install timm`") from e
    model = timm.create_model(TIMM_ARCH, pretrained=False,
                              **timm_kwargs(encoder, global_pool))
    model.load_state_dict(timm_state_dict(encoder, sigma), strict=True)
    w = encoder.patch_embed.proj.weight
    return model.to(device=w.device, dtype=w.dtype).eval()
