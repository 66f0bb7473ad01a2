"""Multi-head attention behind one function, with the backend chosen at run time.

Backends, all taking and returning (B, heads, N, head_dim) tensors:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. On CUDA PyTorch dispatches it to
  FlashAttention-2, cuDNN or the memory-efficient kernel by itself, so this one name covers the
  fast fused paths; on CPU it runs PyTorch's fused CPU kernel.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (``pip install ldae-fast[gpu]``).
  It wants (B, N, heads, head_dim), which is a free transpose of our layout (a view, no copy).
- ``math``: ``ldae_fast.reference.attention``, softmax(q k^T / sqrt(d)) v in float32. The spec.
- ``flash``, ``cudnn``, ``efficient``: SDPA held to one of its fused kernels through
  ``torch.nn.attention.sdpa_kernel`` (FlashAttention-2, cuDNN's fused attention, the
  memory-efficient kernel), so a benchmark measures the kernel it names instead of the one SDPA
  picks. Off unless asked for: which wins on Hopper at head_dim 64 is a GPU run's answer. Where
  the pinned kernel cannot run (no CUDA for cuDNN and efficient, a torch without sdpa_kernel or
  that backend, inputs it refuses) the error says so in one line; nothing falls back silently.

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
from ..errors import UsageError

# The SDPA kernels a backend name pins, by torch's SDPBackend member name.
SDPA_PINNED = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
BACKENDS = ("auto", "sdpa", "xformers", "math", *SDPA_PINNED)

_INSTALL_HINT = "install it with `pip install ldae-fast[gpu]` (or `pip install xformers`)"


class AttentionBackendError(RuntimeError, UsageError):
    """The requested attention backend does not exist or cannot run here (one line, exit 2)."""

    exit_code = 2
    category = "config error"


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
    for name in SDPA_PINNED:
        try:
            resolve_backend(name)
        except AttentionBackendError:
            continue
        out.append(name)
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
    if backend in SDPA_PINNED:
        _sdpa_backend(backend)  # a torch without it fails here, at construction
        if backend != "flash" and not torch.cuda.is_available():
            raise AttentionBackendError(
                f"model.attn_backend={backend!r} pins SDPA's CUDA-only {SDPA_PINNED[backend]} kernel and "
                "no CUDA device is present; use 'sdpa' (or 'flash', which SDPA also has on CPU)")
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


def _sdpa_backend(backend: str):
    """torch's SDPBackend member a pinned backend name means, or a one-line error naming the
    torch version that lacks it."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
    except ImportError:
        raise AttentionBackendError(
            f"model.attn_backend={backend!r} needs torch.nn.attention.sdpa_kernel (torch >= 2.3); this is "
            f"torch {torch.__version__}: use 'sdpa'") from None
    member = getattr(SDPBackend, SDPA_PINNED[backend], None)
    if member is None:
        raise AttentionBackendError(
            f"model.attn_backend={backend!r}: torch {torch.__version__} has no SDPBackend.{SDPA_PINNED[backend]}; "
            "use 'sdpa'")
    return member


def _pinned(backend: str):
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention import sdpa_kernel

        try:
            with sdpa_kernel(_sdpa_backend(backend)):
                return F.scaled_dot_product_attention(q, k, v)
        except RuntimeError as e:
            # torch's words for "the pinned kernel refused these inputs" (they changed over versions)
            if isinstance(e, AttentionBackendError) or not any(
                    w in str(e) for w in ("No available kernel", "No viable backend")):
                raise
            raise AttentionBackendError(
                f"model.attn_backend={backend!r}: SDPA's {SDPA_PINNED[backend]} kernel cannot run on "
                f"{q.device.type} for {q.dtype} q of shape {tuple(q.shape)}; use 'sdpa'") from None
    return run


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    xops = _xformers_ops()
    if xops is None:
        raise AttentionBackendError(f"xformers is not installed; {_INSTALL_HINT}")
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return reference.attention(q, k, v)


_IMPLS = {"sdpa": _sdpa, "xformers": _xformers, "math": _math, **{b: _pinned(b) for b in SDPA_PINNED}}


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
