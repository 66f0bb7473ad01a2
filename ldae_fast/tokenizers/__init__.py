"""Tokenizers: the map between image patches and the latent a method adds its noise in.

The registry is the only way the rest of the package reaches a tokenizer: `prepare_tokenizer`
builds the one the config names (fitting it, or loading tokenizer.path whatever its kind),
`tokenizer_from_state` rebuilds a saved one from its tensors and metadata (which name their kind).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..tokenizer_kinds import FITTED, KINDS
from . import conv_vae, patch_ae, patch_vae, pca, pixel
from .base import Tokenizer
from .conv_vae import ConvVAETokenizer
from .patch_ae import PatchAETokenizer
from .patch_vae import PatchVAETokenizer
from .pca import PCATokenizer, TokenizerMismatch, fit_pca
from .pixel import PixelTokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    prepare: Callable[..., Tokenizer]
    """(cfg, images: () -> iterable of (B, C, H, W) batches, log) -> the run's tokenizer."""
    from_state: Callable[[dict, dict], Tokenizer]
    """(tensors, metadata) -> the tokenizer they describe."""
    fitted: bool = True
    """Fitted to data (`ldae-fast fit-tokenizer --kind`); False: fixed (pixels)."""


TOKENIZERS: dict[str, TokenizerSpec] = {
    "pca": TokenizerSpec(pca.prepare, PCATokenizer.from_state, fitted=FITTED["pca"]),
    "pixel": TokenizerSpec(pixel.prepare, PixelTokenizer.from_state, fitted=FITTED["pixel"]),
    "patch-ae": TokenizerSpec(patch_ae.prepare, PatchAETokenizer.from_state, fitted=FITTED["patch-ae"]),
    "patch-vae": TokenizerSpec(patch_vae.prepare, PatchVAETokenizer.from_state, fitted=FITTED["patch-vae"]),
    "conv-vae": TokenizerSpec(conv_vae.prepare, ConvVAETokenizer.from_state, fitted=FITTED["conv-vae"]),
}
assert tuple(TOKENIZERS) == KINDS, "tokenizer_kinds.FITTED and TOKENIZERS name the same kinds"


def _spec(kind: str, where: str) -> TokenizerSpec:
    if kind not in TOKENIZERS:
        raise ValueError(f"{where}={kind!r} is not a known tokenizer; known: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind]


def fit_config(cfg):
    """The config whose training stream a tokenizer is fitted on: center crops, no flip, whatever
    the run's augmentation (l-DAE fits its PCA on un-augmented patches)."""
    import dataclasses

    if cfg.data.crop == "center":
        return cfg
    return cfg.replace(data=dataclasses.replace(cfg.data, crop="center"))


def prepare_tokenizer(cfg, images: Callable[[], Iterable[torch.Tensor]], log: Callable[[str], None] = print
                      ) -> Tokenizer:
    if cfg.tokenizer.path:
        return load_tokenizer_path(cfg, log)
    return _spec(cfg.tokenizer.kind, "tokenizer.kind").prepare(cfg, images, log)


def load_tokenizer_path(cfg, log: Callable[[str], None] = print) -> Tokenizer:
    """tokenizer.path, of the kind its metadata names, checked against the run's patch size and
    latent dim; a file that is not a tokenizer is the user's file error."""
    from ..config import ConfigError
    from ..errors import FileProblem, UserError
    from ._io import TokenizerFileError, read_tokenizer_file

    path, t = cfg.tokenizer.path, cfg.tokenizer
    try:
        tensors, meta = read_tokenizer_file(path)
        kind = meta.get("kind", "pca")
        spec = TOKENIZERS.get(kind)
        if spec is None:
            raise ValueError(f"its kind {kind!r} is not a known tokenizer")
        for key, field, want in (("patch_size", "model.patch_size", cfg.model.patch_size),
                                 ("latent_dim", "tokenizer.latent_dim", t.latent_dim)):
            if meta.get(key) != want:
                raise TokenizerMismatch(
                    f"tokenizer {path} has {key}={meta.get(key)!r} but the config asks for {field}={want!r}; "
                    f"pass --{field}={meta.get(key)} or refit with `ldae-fast fit-tokenizer --kind {kind}`")
        tok = spec.from_state(tensors, meta)
    except (FileNotFoundError, UserError):
        raise
    except TokenizerMismatch as e:
        raise ConfigError(f"tokenizer.path: {e}") from e
    except TokenizerFileError as e:  # tensors that contradict their kind: the input file is named
        raise FileProblem(f"tokenizer.path={path}: {e}") from e
    except Exception as e:  # whatever safetensors or a kind's shape checks raise on a foreign file
        raise FileProblem(f"tokenizer.path={path}: not a readable tokenizer .safetensors "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if kind != t.kind:
        log(f"tokenizer.path={path} holds a {kind!r} tokenizer: using it (tokenizer.kind={t.kind!r} names "
            "the kind a fit would make)")
    return tok


def tokenizer_from_state(tensors: dict[str, torch.Tensor], meta: dict) -> Tokenizer:
    return _spec(meta.get("kind", "pca"), "the saved tokenizer's kind").from_state(tensors, meta)


__all__ = ["TOKENIZERS", "ConvVAETokenizer", "PCATokenizer", "PatchAETokenizer", "PatchVAETokenizer",
           "PixelTokenizer", "Tokenizer", "TokenizerMismatch", "TokenizerSpec", "fit_config", "fit_pca",
           "load_tokenizer_path", "prepare_tokenizer", "tokenizer_from_state"]
