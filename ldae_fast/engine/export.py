"""`ldae-fast export CKPT OUT.safetensors`: the encoder with timm VisionTransformer names.

The file loads strictly into `timm.create_model(<any vit name>, pretrained=False, **kwargs)` with the
kwargs stored in its metadata; `load_exported_encoder` does exactly that, so evaluation can run
from an export alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Config, sanitize_stored_config


class TimmEncoder(torch.nn.Module):
    """A timm VisionTransformer behind our encoder interface (forward_features / pooled)."""

    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        self.vit = vit
        self.num_features = vit.embed_dim
        self.blocks = vit.blocks

    def forward_features(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        return self.vit.forward_features(x)

    def pooled(self, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        tok = self.forward_features(x)
        return tok[:, 0] if pool == "cls" else tok[:, 1:].mean(1)


class EncoderOnly(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder


def export_encoder(ckpt: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    from ..models.timm_export import timm_kwargs, timm_state_dict
    from .checkpoint import load_for_eval

    cfg, model, _ = load_for_eval(ckpt, use_ema=use_ema)
    sd = {k: v.detach().float().contiguous() for k, v in timm_state_dict(model.encoder).items()}
    meta = {"timm_kwargs": json.dumps(timm_kwargs(model.encoder)), "ldae_config": json.dumps(cfg.to_dict()),
            "source": str(ckpt), "weights": "ema" if use_ema else "model"}
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def load_exported_encoder(path: str | Path):
    """-> (Config, EncoderOnly(TimmEncoder), None) from an exported .safetensors."""
    import timm
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if "timm_kwargs" not in meta:
        raise ValueError(f"{path} was not written by `ldae-fast export` (no timm_kwargs metadata)")
    kwargs = json.loads(meta["timm_kwargs"])
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
    vit.load_state_dict(sd, strict=True)
    vit.eval()
    cfg = Config.from_dict(sanitize_stored_config(json.loads(meta["ldae_config"]), f"export {path}"))
    return cfg, EncoderOnly(TimmEncoder(vit)).eval(), None


def main(argv: list[str] | None = None) -> int:
    from ..errors import run_cli

    return run_cli(_main, argv, "ldae-fast export")


def _main(argv: list[str]) -> int:
    from ..errors import ArgParser

    ap = ArgParser(prog="ldae-fast export", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="checkpoint directory (step_*), run directory, or DeepSpeed checkpoint")
    ap.add_argument("out", help="output .safetensors")
    ap.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    a = ap.parse_args(argv)
    path = export_encoder(a.checkpoint, a.out, use_ema=not a.no_ema)
    kwargs = json.loads(_meta(path)["timm_kwargs"])
    print(f"wrote {path}\nload with: timm.create_model('vit_base_patch16_224', pretrained=False, **{kwargs})"
          " then load_state_dict(safetensors.torch.load_file(path), strict=True)")
    return 0


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
