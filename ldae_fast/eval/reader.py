"""Loading for evaluation and export: a checkpoint (ours, DeepSpeed's, a run directory) or an
exported encoder, as (config, model, method).

The reading side of the checkpoint and export formats; the checkpoint writer stays in engine/,
the export writer is eval/export.py. It builds
models and the method through their registries, so the engine never has to.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import methods  # noqa: F401 (registers the methods' config sections, names and presets)
from ..config import Config, ConfigError, sanitize_stored_config
from ..errors import CheckpointError, FileProblem


class TimmEncoder(torch.nn.Module):
    """A timm VisionTransformer behind our encoder interface (forward_features / pooled)."""

    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        self.vit = vit
        self.num_features = vit.embed_dim
        self.blocks = vit.blocks
        # 1 for an export of layout 'mae' (its class token), 0 for 'dit' (no class token).
        self.num_prefix_tokens = int(vit.num_prefix_tokens)

    def forward_features(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        return self.vit.forward_features(x)

    def pooled(self, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        if pool == "cls" and not self.vit.has_class_token:
            raise ValueError("pool='cls' needs a class token; this export (ldae.layout='dit') has none "
                             "(use pool='avg')")
        tok = self.forward_features(x)
        return tok[:, 0] if pool == "cls" else tok[:, self.num_prefix_tokens:].mean(1)


class EncoderOnly(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder


def load_exported_encoder(path: str | Path):
    """-> (Config, EncoderOnly(TimmEncoder), None) from an export directory or its .safetensors.
    A file that is not an export of ours is a FileProblem naming it."""
    import timm

    from ..models.timm_export import WEIGHTS_FILE

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    meta, sd = _read_safetensors(path)
    if "timm_kwargs" not in meta or "ldae_config" not in meta:
        raise FileProblem(f"{path} was not written by `ldae-fast export` (no timm_kwargs / ldae_config "
                          "metadata): pass an export directory, its model.safetensors or a checkpoint")
    try:
        kwargs, stored = json.loads(meta["timm_kwargs"]), json.loads(meta["ldae_config"])
    except ValueError as e:
        raise FileProblem(f"{path}: its export metadata is not valid JSON ({e})") from None
    if not isinstance(kwargs, dict) or not isinstance(stored, dict):
        raise FileProblem(f"{path}: its export metadata does not hold JSON objects")
    try:
        cfg = Config.from_dict(sanitize_stored_config(stored, f"export {path}"))
    except ConfigError as e:
        raise FileProblem(f"{path}: its stored config is not valid ({e})") from None
    try:
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
        vit.load_state_dict(sd, strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError, AssertionError) as e:
        # timm checks its constructor arguments with assert; a forged file is still a file error.
        raise FileProblem(f"{path}: its weights do not fit the ViT its metadata describes "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    vit.eval()
    return cfg, EncoderOnly(TimmEncoder(vit)).eval(), None


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors file; one line naming the file when it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise FileProblem(f"{path}: not a readable safetensors file ({e})") from None


def _check_checkpoint_path(p: Path, flag: str) -> None:
    """A path that is no checkpoint at all, in the caller's words (`flag`: how its user names it)."""
    if not p.exists():
        raise FileNotFoundError(f"{flag} {p}: no such file or directory")
    if p.is_file() and p.name != "state.pt":
        raise CheckpointError(f"{flag} {p}: not a checkpoint (a step_*/ directory with meta.json, a run "
                              "directory holding checkpoints/, or an exported .safetensors encoder)")


def load_for_eval(path: str | Path, use_ema: bool = True, flag: str = "checkpoint"):
    """-> (Config, model, Method | None) from a checkpoint dir, a run dir, a DeepSpeed checkpoint
    written by our engine, or an exported encoder .safetensors (then the model holds the encoder
    alone and there is no method). The method is on the CPU with engine.kernels='auto' (a run
    trained with 'triton' on a GPU still loads on a CPU); move it with `.to(device)`. `flag`
    names the path in messages ('--checkpoint' for eval's command line)."""
    from ..engine.checkpoint import load_state, method_state, resolve_resume
    from ..methods import build_method, build_model
    from ..models.timm_export import WEIGHTS_FILE

    path = Path(path)
    if path.suffix == ".safetensors" or (path / WEIGHTS_FILE).is_file():
        return load_exported_encoder(path)
    _check_checkpoint_path(path, flag)
    ckpt = resolve_resume(str(path), path, flag=flag)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint at {path}")
    st = load_state(ckpt)
    cfg = Config.from_dict(sanitize_stored_config(st["config"], f"checkpoint {ckpt}"))
    model = build_model(cfg)
    weights = st.get("ema") if use_ema and st.get("ema") else st.get("model")
    if weights is None:
        from ..engine.deepspeed_backend import consolidated_model_state
        weights = consolidated_model_state(ckpt)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}: its weights do not fit the model its own config describes "
                              f"({str(e).splitlines()[0]})") from None
    model.eval()
    ms = method_state(st)
    method = None
    if ms is not None:
        from ..tokenizers._io import TokenizerFileError

        method = build_method(cfg, "cpu", kernels="auto")
        try:
            method.load_state_dict(ms)
        except TokenizerFileError as e:
            raise CheckpointError(f"{ckpt}: its tokenizer is damaged ({e})") from None
    return cfg, model, method
