"""Checkpoints: one directory per step, written atomically, found again by `--resume auto`.

Layout: OUT/checkpoints/step_00001234/{state.pt, meta.json}. A checkpoint is written into a
temporary sibling directory and renamed into place, and meta.json is written last, so a directory
named step_* without meta.json (a crash mid-write, a copy cut short) is never taken as complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..tokenizers import tokenizer_from_state

_STEP_RE = re.compile(r"^step_(\d+)$")


def ckpt_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def is_complete(d: Path) -> bool:
    return d.is_dir() and _STEP_RE.match(d.name) is not None and (d / "meta.json").is_file()


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = ckpt_root(out_dir)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if is_complete(d)]
    return sorted(found, key=lambda d: int(_STEP_RE.match(d.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    cks = list_checkpoints(out_dir)
    return cks[-1] if cks else None


def write_checkpoint(out_dir: str | Path, step: int, state: dict[str, Any], keep_last: int,
                     extra_meta: dict | None = None, writer=None, is_main: bool = True,
                     barrier=None) -> Path:
    """Write `state` for `step` atomically; prune to the newest `keep_last` complete ones.

    `writer(tmp_dir)` may write additional files before the rename (DeepSpeed's sharded state). In
    a multi-rank run every rank calls this with `barrier` set: rank 0 owns the directory and the
    rename, every rank runs `writer` into the same temporary directory.
    """
    def sync() -> None:
        if barrier is not None:
            barrier()

    root = ckpt_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    sync()
    if writer is not None:
        writer(tmp)
    sync()
    if is_main:
        torch.save(state, tmp / "state.pt")
        meta = {"step": step, "time": time.time(), **(extra_meta or {})}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. end of run == periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    sync()
    return final


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """'' -> None; 'auto' -> newest complete checkpoint in out_dir or None; a path -> that path."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(out_dir)
    p = Path(resume)
    if p.is_file() and p.name == "state.pt":
        p = p.parent
    if not p.exists():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    if p.is_dir() and not is_complete(p):
        latest = latest_checkpoint(p)  # a run directory was given
        if latest is None:
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no meta.json) "
                                    f"and no complete checkpoint under {p / 'checkpoints'}")
        p = latest
    return p


def load_state(ckpt: str | Path, map_location="cpu") -> dict[str, Any]:
    return torch.load(Path(ckpt) / "state.pt", map_location=map_location, weights_only=False)


def method_state(state: dict) -> dict | None:
    """The method's part of a checkpoint; checkpoints written before it nested under 'method'
    kept the tokenizer at the top level."""
    if state.get("method"):
        return state["method"]
    if state.get("tokenizer"):
        return {"tokenizer": state["tokenizer"]}
    return None


def load_for_eval(path: str | Path, use_ema: bool = True):
    """-> (Config, LDAEModel, Tokenizer | None) from a checkpoint dir, a run dir, a DeepSpeed
    checkpoint written by our engine, or an exported encoder .safetensors (then the model holds the
    encoder alone and the tokenizer is None)."""
    from ..models import build_model

    path = Path(path)
    if path.suffix == ".safetensors":
        from .export import load_exported_encoder
        return load_exported_encoder(path)
    ckpt = resolve_resume(str(path), path)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint at {path}")
    st = load_state(ckpt)
    cfg = Config.from_dict(st["config"])
    model = build_model(cfg.model, cfg.data.img_size)
    weights = st.get("ema") if use_ema and st.get("ema") else st.get("model")
    if weights is None:
        from .deepspeed_backend import consolidated_model_state
        weights = consolidated_model_state(ckpt)
    model.load_state_dict(weights)
    model.eval()
    ms = method_state(st)
    tok = (tokenizer_from_state(ms["tokenizer"]["tensors"], ms["tokenizer"]["meta"])
           if ms and "tokenizer" in ms else None)  # a method without a tokenizer (DiffMAE)
    return cfg, model, tok


def config_of(ckpt: str | Path) -> Config:
    return Config.from_dict(load_state(ckpt)["config"])
