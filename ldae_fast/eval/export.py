"""`ldae-fast export CKPT OUT_DIR`: the encoder as a timm VisionTransformer in timm's local-dir layout.

OUT_DIR/config.json (architecture, constructor arguments, input size, mean/std) and
OUT_DIR/model.safetensors load with `timm.create_model('local-dir:OUT_DIR', pretrained=True)`,
strictly. The weights file also carries the timm kwargs in its metadata; `eval.reader.load_exported_encoder`
reads them, so evaluation can run from an export alone.
"""

from __future__ import annotations

import json
from pathlib import Path

# The heavy imports (torch, the models) sit inside export_encoder: `ldae-fast export --help` and
# usage errors answer before torch is imported.


def export_encoder(ckpt: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """Write OUT/config.json + OUT/model.safetensors (timm's local-dir layout); -> the weights file.

    The safetensors metadata also carries the timm kwargs and our config, which is what
    `load_exported_encoder` reads, so evaluation can run from the weights file alone.
    """
    from safetensors.torch import save_file

    from ..errors import UsageError
    from ..models.timm_export import WEIGHTS_FILE, timm_config, timm_kwargs, timm_state_dict
    from .reader import load_for_eval

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory; the export is a directory "
                              f"({out}/config.json + {out}/{WEIGHTS_FILE})")
    cfg, model, _ = load_for_eval(ckpt, use_ema=use_ema)
    if cfg.model.num_frames:
        # timm's VisionTransformer has a 2-D patch embedding; it would reject the Conv3d's weights.
        raise UsageError(f"{ckpt}: a video encoder (model.num_frames={cfg.model.num_frames}, spacetime "
                         "patches) has no timm VisionTransformer form to export")
    sd = {k: v.detach().float().contiguous() for k, v in timm_state_dict(model.encoder).items()}
    meta = {"timm_kwargs": json.dumps(timm_kwargs(model.encoder)), "ldae_config": json.dumps(cfg.to_dict()),
            "source": str(ckpt), "weights": "ema" if use_ema else "model"}
    out.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: timm needs both, and a directory without config.json is
    # plainly unfinished rather than a config pointing at stale or missing weights.
    for name, write in ((WEIGHTS_FILE, lambda t: save_file(sd, str(t), metadata=meta)),
                        ("config.json", lambda t: t.write_text(
                            json.dumps(timm_config(model.encoder), indent=2) + "\n"))):
        tmp = out / (name + ".tmp")
        write(tmp)
        tmp.replace(out / name)
    return out / WEIGHTS_FILE


def main(argv: list[str] | None = None) -> int:
    from ..errors import run_cli

    return run_cli(_main, argv, "ldae-fast export")


def _main(argv: list[str]) -> int:
    from ..errors import ArgParser

    ap = ArgParser(
        prog="ldae-fast export", description=__doc__.split("\n")[0],
        epilog="Load with timm.create_model('local-dir:OUT_DIR', pretrained=True); evaluate with "
               "`ldae-fast eval --checkpoint OUT_DIR/model.safetensors`.")
    ap.add_argument("checkpoint", help="checkpoint directory (step_*), run directory, or DeepSpeed checkpoint")
    ap.add_argument("out", metavar="OUT_DIR", help="output directory (created): config.json + model.safetensors")
    ap.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    a = ap.parse_args(argv)
    path = export_encoder(a.checkpoint, a.out, use_ema=not a.no_ema)
    print(f"wrote {path.parent}/config.json and {path}\n"
          f"load with: timm.create_model('local-dir:{path.parent}', pretrained=True)")
    return 0


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
