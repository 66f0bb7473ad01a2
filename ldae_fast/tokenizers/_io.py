"""Shared pieces of the learned tokenizers: their file format, the patches they fit on, the
seeded optimiser schedule.

Every tokenizer file is a safetensors file whose header carries the metadata as JSON under
'ldae_tokenizer' (the key PCATokenizer.save writes), so one reader serves every kind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from .. import reference
from ..lr_schedule import lr_at_step

TAG_TOKENIZER_FIT = 49
"""Seed domain of a tokenizer fit (init, patch subsampling, minibatches, VAE noise): the
methods' range of ldae_fast.seeding (31-49), from its top so the methods' tags stay apart."""


def save_tokenizer_file(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """`path` (safetensors, metadata in its header, written via a temporary sibling) and a
    human-readable `path`.json."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"refusing to write tokenizer {path}: non-finite values in {', '.join(bad)}")
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"ldae_tokenizer": json.dumps(meta)})
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


class TokenizerFileError(ValueError):
    """A tokenizer's tensors contradict what its kind promises (shape, finiteness, orthonormality);
    whoever knows the file names it."""


ORTHONORMAL_ATOL = 1e-4
"""max |V V^T - I| a saved basis may show (a float32 basis from a float64 eigh shows ~1e-6)."""


def check_tensors(kind: str, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                  orthonormal: tuple[str, ...] = (), why: str = "") -> None:
    """Raise TokenizerFileError unless every tensor of `shapes` is present with its shape, every
    floating tensor is finite, and the tensors named in `orthonormal` have orthonormal rows.
    `why` says where the expected shapes come from (the metadata's patch size, d, channels)."""
    for name, shape in shapes.items():
        got = tuple(tensors[name].shape) if name in tensors else None
        if got != tuple(shape):
            raise TokenizerFileError(f"{kind} tokenizer: tensor {name!r} is {got or 'missing'}, expected "
                                     f"{tuple(shape)}{f' ({why})' if why else ''}")
    for name, t in tensors.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise TokenizerFileError(f"{kind} tokenizer: tensor {name!r} holds {bad} non-finite value(s) "
                                         "(NaN/inf); the file is damaged or its fit diverged: refit it")
    for name in orthonormal:
        V = tensors[name].double()
        err = float((V @ V.T - torch.eye(V.shape[0], dtype=V.dtype)).abs().max()) if V.numel() else 0.0
        if err > ORTHONORMAL_ATOL:
            raise TokenizerFileError(f"{kind} tokenizer: tensor {name!r} is not an orthonormal basis "
                                     f"(max |V V^T - I| = {err:.3g} > {ORTHONORMAL_ATOL:g}), which a {kind} "
                                     "tokenizer's loss and inverse rely on; the file was altered or written by "
                                     "something else: refit it")


def read_tokenizer_file(path: str | Path, fit_command: str = "ldae-fast fit-tokenizer"
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors, metadata) of a tokenizer file; FileNotFoundError (naming `fit_command`) when
    absent, ValueError when the file is not an ldae-fast tokenizer."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (fit one with `{fit_command}`)")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "ldae_tokenizer" not in header:
        raise ValueError(f"{path} is not an ldae-fast tokenizer (no 'ldae_tokenizer' metadata)")
    meta = json.loads(header["ldae_tokenizer"])
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its 'ldae_tokenizer' metadata is not a JSON object")
    return tensors, meta


def collect_patches(images: Iterable[torch.Tensor], patch_size: int, max_images: int, max_patches: int,
                    seed: int) -> tuple[torch.Tensor, int]:
    """(n, C p^2) float32 patches of the first `max_images` images, and C.

    At most ceil(max_patches / max_images) patches are kept per image, drawn at random (keyed on
    the seed and the image's place in the stream), so memory stays bounded by max_patches however
    large the images and every image contributes alike."""
    from ..seeding import derive_seed

    per_image = max(1, math.ceil(max_patches / max_images))
    kept, seen, channels = [], 0, 3
    for batch in images:
        batch = batch[: max_images - seen]
        if batch.shape[0] == 0:
            break
        channels = batch.shape[1]
        tok = reference.patchify(batch.float().cpu(), patch_size)  # (B, N, D)
        B, N, _ = tok.shape
        if N > per_image:
            g = torch.Generator().manual_seed(derive_seed(seed, TAG_TOKENIZER_FIT, 1, seen))
            idx = torch.rand(B, N, generator=g).argsort(dim=1)[:, :per_image]
            tok = torch.gather(tok, 1, idx[..., None].expand(-1, -1, tok.shape[-1]))
        kept.append(tok.reshape(-1, tok.shape[-1]))
        seen += B
        if seen >= max_images:
            break
    if not kept:
        raise ValueError("the tokenizer fit got no images")
    patches = torch.cat(kept)
    return patches[:max_patches].contiguous(), channels


def set_fit_lr(opt: torch.optim.Optimizer, lr: float, step: int, steps: int) -> None:
    """Set `opt`'s lr for this step of a fit: `lr_at_step` to 0 over `steps`, with a short warm-up
    (5%) so Adam's first, poorly-estimated steps stay small."""
    for g in opt.param_groups:
        g["lr"] = lr_at_step(step, lr, max(1, steps // 20), steps)


def finite_stats(**stats: float) -> dict:
    """Plain floats for metadata; a non-finite fit is an error, never a saved tokenizer."""
    out = {k: float(v) for k, v in stats.items()}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"the tokenizer fit diverged ({', '.join(bad)} non-finite); lower tokenizer.fit_lr (conv-vae: tokenizer.conv_lr)")
    return out
