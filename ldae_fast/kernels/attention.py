"""Multi-head attention behind one function, with the backend chosen at run time.

Backends, all taking and returning (B, heads, N, head_dim) tensors:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. On CUDA PyTorch dispatches it to
  FlashAttention-2, cuDNN or the memory-efficient kernel by itself, so this one name covers the
  fast fused paths; on CPU it runs PyTorch's fused CPU kernel.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (``pip install ldae-fast[gpu]``).
  It wants (B, N, heads, head_dim), which is a free transpose of our layout (a view, no copy).
- ``math``: ``ldae_fast.reference.attention``, softmax(q k^T / sqrt(d)) v in float32. The spec.

``auto`` is ``sdpa``. For the l-DAE encoder/decoder (no mask, no dropout, head_dim 64) SDPA's
flash/cuDNN kernels are at least as fast as xformers on every GPU PyTorch 2.4+ supports, and it
needs no extra package, so a run-time race between the two would add start-up cost and
non-determinism for no gain. Ask for ``xformers`` explicitly to compare.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import reference

BACKENDS = ("auto", "sdpa", "xformers", "math")

_INSTALL_HINT = "install it with `pip install ldae-fast[gpu]` (or `pip install xformers`)"


class AttentionBackendError(RuntimeError):
    """The requested attention backend does not exist or cannot run here."""


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    """The xformers.ops module, or None when it cannot be imported.

    Cached because importing xformers is slow and its answer does not change within a process.
    Any exception counts as "missing": broken builds raise all sorts of things at import time.
    """
    try:
        import xformers.ops as xops  # type: ignore[import-not-found]
    except Exception:
        return None
    return xops


def _xformers_usable() -> bool:
    # xformers' fused kernels are CUDA-only; its CPU fallbacks are slower than SDPA and partial.
    return _xformers_ops() is not None and torch.cuda.is_available()


def available_backends() -> list[str]:
    """Concrete backends that can run in this process (``auto`` excluded)."""
    out = ["sdpa", "math"]
    if _xformers_usable():
        out.append("xformers")
    return out


def resolve_backend(backend: str = "auto") -> str:
    """Map a requested backend name to the concrete one that will run, or raise a clear error.

    Models call this once at construction so a bad or missing backend fails before training.
    """
    if backend not in BACKENDS:
        raise AttentionBackendError(
            f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "sdpa"
    if backend == "xformers":
        if _xformers_ops() is None:
            raise AttentionBackendError(
                f"attention backend 'xformers' was requested but xformers is not installed; "
                f"{_INSTALL_HINT}, or use attn_backend='sdpa'")
        if not torch.cuda.is_available():
            raise AttentionBackendError(
                "attention backend 'xformers' needs a CUDA device; use attn_backend='sdpa' on CPU")
    return backend


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    xops = _xformers_ops()
    if xops is None:
        raise AttentionBackendError(f"xformers is not installed; {_INSTALL_HINT}")
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return reference.attention(q, k, v)


_IMPLS = {"sdpa": _sdpa, "xformers": _xformers, "math": _math}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for (B, heads, N, head_dim) q, k, v; same shape out.

    No mask and no dropout: l-DAE attends over all tokens and trains without attention dropout.
    """
    if (q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:2] != q.shape[:2]
            or k.shape[-1] != q.shape[-1] or v.shape[:3] != k.shape[:3]):
        raise ValueError(
            f"attention expects q (B, heads, N, d), k (B, heads, M, d), v (B, heads, M, dv); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    impl = _IMPLS.get(backend)
    if impl is None:
        impl = _IMPLS[resolve_backend(backend)]
    return impl(q, k, v)
