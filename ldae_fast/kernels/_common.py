"""Shared pieces of the Triton kernels: the optional triton import, interpreter detection, the
launcher's argument checks and small tiling helpers.

Importing this module never fails when triton is missing (macOS, Windows, CPU-only wheels): the
kernels' modules still import, so the plain-PyTorch path keeps working, and only a call that asks
for the Triton path raises, with a message saying what to do.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings
from typing import Any, Callable, Iterable, NamedTuple, Optional

import torch

try:  # pragma: no cover - which branch runs depends on the platform
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton missing or broken
    HAS_TRITON = False

    class _ShimLanguage:
        """Enough of triton.language for the kernel signatures to be evaluated at import time."""

        constexpr = object

    class _ShimTriton:
        @staticmethod
        def jit(fn=None, **_kwargs):
            # The decorated function is never launched: launchers check HAS_TRITON first.
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, int(n) - 1).bit_length()

    triton = _ShimTriton()  # type: ignore[assignment]
    tl = _ShimLanguage()  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "triton", "tl"]

# float dtypes the image-layout kernels read and write; all arithmetic is float32 inside.
IMAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

REFERENCE_HINT = "use kernels='reference' (the plain-PyTorch path)"


def interpreter_env() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter (triton reads it when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def version_tuple(version: str) -> tuple[int, int]:
    """'2.14.1+cu130' -> (2, 14); (0, 0) when it does not start with two numbers."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


@functools.lru_cache(maxsize=1)
def _triton_version() -> tuple[int, int]:
    return version_tuple(getattr(triton, "__version__", "")) if HAS_TRITON else (0, 0)


@functools.lru_cache(maxsize=1)
def _numpy_version() -> tuple[int, int]:
    import numpy

    return version_tuple(numpy.__version__)


def _fix_interpreter_index() -> None:
    """triton < 3.7's interpreter turns a scalar kernel argument (a shape-(1,) array) into an int
    with int(array), which NumPy >= 2.4 refuses: `range(0, D, BLOCK_D)` over a runtime D raises
    TypeError (triton-lang/triton#9171). Re-patch tensor.__index__ to take the one element, as
    3.7 does. Only the interpreter is touched; compiled kernels never see numpy."""
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover - layout of a triton we do not know
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_ldae_index_fix", False):
        return

    def _index(self):
        return int(self.handle.data.item())

    def patched(tensor, *args, **kwargs):
        orig(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")  # newer tritons undo patches via a scope
        if scope is not None:
            scope.set_attr(tensor, "__index__", _index)
        else:
            tensor.__index__ = _index

    patched._ldae_index_fix = True
    _interp._patch_lang_tensor = patched


def is_interpreted(kernel: Any) -> bool:
    """Whether this @triton.jit function runs in the interpreter.

    Asks the kernel object rather than the environment: triton decides at decoration time, so
    setting TRITON_INTERPRET after `ldae_fast.kernels` was imported changes nothing.
    """
    return type(kernel).__name__ == "InterpretedFunction"


if HAS_TRITON and interpreter_env() and _triton_version() < (3, 7):
    _fix_interpreter_index()


def triton_available(device: Optional[torch.device | str] = None, kernel: Any = None) -> bool:
    """Whether the Triton path can run: triton imports, and either a CUDA device is present or the
    kernels were defined under the interpreter (TRITON_INTERPRET=1 before the first import).

    With `device`, answers for that device only ('cuda...' needs CUDA, 'cpu' the interpreter).
    `kernel`: one of the @triton.jit kernels of this process; triton fixes the interpreter choice
    when a kernel is defined, so the kernel answers even after the environment changed
    (`ldae_fast.kernels.triton_available` passes one in).
    """
    if not HAS_TRITON:
        return False
    interp = interpreter_env() or (kernel is not None and is_interpreted(kernel))
    if device is None:
        return interp or torch.cuda.is_available()
    dev = torch.device(device)
    if dev.type == "cpu":
        return interp
    return dev.type == "cuda" and torch.cuda.is_available() and not interp


def check_runnable(kernel: Any, device: torch.device, op: str) -> None:
    """Raise a clear RuntimeError when `kernel` cannot run on tensors of `device`."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: triton is not installed, so the Triton kernels cannot run; "
                           f"install triton or {REFERENCE_HINT}")
    interp = is_interpreted(kernel)
    if interp and _triton_version() < (3, 2) and _numpy_version() >= (2, 0):
        # libtriton's interpreter load/store in 3.0 / 3.1 misread NumPy 2 arrays: silent garbage.
        raise RuntimeError(
            f"{op}: the Triton {triton.__version__} interpreter gives wrong results with NumPy "
            f"{_numpy_version()[0]}.x; install 'numpy<2', or triton >= 3.2, or {REFERENCE_HINT}")
    if device.type == "cpu" and not interp:
        raise RuntimeError(
            f"{op}: the Triton kernels got CPU tensors but are compiled for GPUs. To run them on CPU "
            f"set TRITON_INTERPRET=1 in the environment before Python starts (triton reads it when "
            f"the kernels are defined), or {REFERENCE_HINT}")
    if device.type == "cuda" and interp:
        raise RuntimeError(
            f"{op}: the Triton kernels were defined under TRITON_INTERPRET=1 and run only on CPU "
            f"tensors; unset TRITON_INTERPRET to run them on the GPU, or {REFERENCE_HINT}")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{op}: tensors on device {device} are not supported by the Triton "
                           f"kernels; {REFERENCE_HINT}")


def check_tensor(
    t: Any,
    name: str,
    op: str,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    contiguous: bool = True,
) -> None:
    """The launcher's per-argument checks: type, rank, dtype, device and contiguity."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{op}: {name} must have dtype {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the image is on {device}; "
                         f"move all arguments to one device")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (call .contiguous() first); "
                         f"got strides {tuple(t.stride())} for shape {tuple(t.shape)}")


def check_int(v: Any, name: str, op: str, lo: int, hi: Optional[int] = None) -> int:
    """An int argument (bools and floats refused, symbolic ints passed through) within [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if isinstance(v, int):
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"{op}: {name}={v} must be {rng}")
    return v


def check_patch(H: int, W: int, p: int, op: str, arg: str = "x") -> None:
    if H % p or W % p:
        raise ValueError(f"{op}: {arg} has spatial size {H}x{W}, not divisible by the patch size p={p}")


class Tiles(NamedTuple):
    """One launch configuration of the image-layout kernels."""

    BLOCK_T: int  # tokens per program
    BLOCK_D: int  # patch elements per trip of the D loop
    BLOCK_K: int  # latent dim d padded to a power of two >= 16 (tl.dot's minimum)
    num_warps: int
    num_stages: int
    prec: str  # tl.dot input_precision


def gpu_tiles(N: int, D: int, d: int, B: int, device: torch.device, prec: str) -> list[Tiles]:
    """Launch configurations to try on a GPU, best first.

    Chosen from ptxas' resource report for sm_90 (AOT builds, triton 3.8), not from timings
    (LDAE_KERNEL_TILES tries another first; bench/README.md): the first tile is the
    largest that builds without register spills and under ~115 KB of shared memory (pipelined
    tiles plus tl.dot operands; tf32x3 stores each operand twice). 128 tokens per tile spilled
    0.3-1.4 KB per thread at d = 16 and 128, so 64 is the most; a larger BLOCK_T would re-read
    the basis from L2 fewer times per image byte. Past d = 256 a tf32x3 dot spills ~20 KB per
    thread where the ieee one (plain fp32 FMA, no less accurate) spills ~1 KB, so it is ieee
    there. The rest shrink shared memory for GPUs with less of it (sm_80: 163 KB, sm_86/89:
    99 KB): fewer tokens, one pipeline stage, then plain FMA dots.
    """
    BLOCK_K = next_pow2(d, 16)
    if BLOCK_K > 256 and prec == "tf32x3":
        prec = "ieee"
    if BLOCK_K <= 32:
        BLOCK_T, BLOCK_D, warps = 64, 32, 4
    elif BLOCK_K <= 128:
        BLOCK_T, BLOCK_D, warps = 64, 32, 8
    elif BLOCK_K <= 256:
        BLOCK_T, BLOCK_D, warps = 32, 16, 8
    else:
        BLOCK_T, BLOCK_D, warps = 16, 16, 8
    # Small batches: shrink token blocks until every SM has a program (at these tiles' shared
    # memory two programs fit an SM, so this is about one full wave). Down to 32 at the most:
    # at d = 128 that tile spills a little (36-72 B), a price only batches too small to fill
    # the GPU at 64 tokens pay.
    while BLOCK_T > 32 and B * -(-N // BLOCK_T) < num_sms(device):
        BLOCK_T //= 2
    stages = 1 if BLOCK_K > 256 else 2
    out = [Tiles(BLOCK_T, BLOCK_D, BLOCK_K, warps, stages, prec)]
    forced = _forced_tiles(BLOCK_K, prec)
    if forced is not None:
        out.insert(0, forced)
    t = BLOCK_T
    while t > 16:
        t //= 2
        out.append(Tiles(t, min(BLOCK_D, 32), BLOCK_K, warps, stages, prec))
    out.append(Tiles(16, 16, BLOCK_K, warps, 1, prec))
    if prec != "ieee":
        out.append(Tiles(16, 16, BLOCK_K, warps, 1, "ieee"))
    return list(dict.fromkeys(out))


def _forced_tiles(BLOCK_K: int, prec: str) -> Optional[Tiles]:
    """LDAE_KERNEL_TILES="BLOCK_T,BLOCK_D,num_warps,num_stages" tries that first (for tuning)."""
    env = os.environ.get("LDAE_KERNEL_TILES", "").strip()
    if not env:
        return None
    try:
        bt, bd, nw, ns = (int(v) for v in env.split(","))
    except ValueError:
        raise ValueError(f"LDAE_KERNEL_TILES={env!r}: expected four ints BLOCK_T,BLOCK_D,num_warps,num_stages") from None
    pow2 = all(v >= 16 and v & (v - 1) == 0 for v in (bt, bd))
    if not pow2 or nw not in (1, 2, 4, 8, 16) or ns < 1:
        raise ValueError(f"LDAE_KERNEL_TILES={env!r}: BLOCK_T and BLOCK_D must be powers of two >= 16, "
                         f"num_warps one of 1,2,4,8,16, num_stages >= 1")
    return Tiles(bt, bd, BLOCK_K, nw, ns, prec)


def interpreter_tiles(N: int, D: int, d: int) -> list[Tiles]:
    """The interpreter pays per program and per loop trip, not per element: few, large tiles."""
    return [Tiles(next_pow2(min(N, 128), 16), next_pow2(min(D, 1024), 16), next_pow2(d, 16), 4, 1, "ieee")]


_TOO_BIG: dict = {}  # (key, tiles) -> the launch error
_FELL_BACK: set = set()


def launch_with_fallback(key: tuple, candidates: list[Tiles], run: Callable[[Tiles], Any]) -> Any:
    """Call run(tiles) with the first candidate this GPU can launch.

    Triton raises OutOfResources at the first launch of a configuration whose shared memory
    exceeds the device's; such configurations are remembered per key and skipped afterwards.
    """
    last: Optional[BaseException] = None
    for tiles in candidates:
        if (key, tiles) in _TOO_BIG:
            continue
        try:
            out = run(tiles)
        except Exception as e:
            if type(e).__name__ != "OutOfResources":
                raise
            _TOO_BIG[(key, tiles)] = str(e)
            last = e
            continue
        if tiles != candidates[0] and (key, tiles) not in _FELL_BACK:
            # Once per op and configuration: a slow benchmark row can then be explained.
            _FELL_BACK.add((key, tiles))
            why = _TOO_BIG.get((key, candidates[0]), "skipped")
            warnings.warn(f"{key[0]}: launch configuration {candidates[0]} does not fit this GPU "
                          f"({why}); using {tiles}", RuntimeWarning, stacklevel=3)
        return out
    raise RuntimeError(f"{key[0]}: no launch configuration fits this GPU (tried {len(candidates)}); "
                       f"use kernels='reference'") from last


def next_pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot's input_precision for float32 operands.

    The kernels multiply float32 tiles. On Ampere+ NVIDIA GPUs 'tf32x3' keeps float32 accuracy
    (three TF32 products) while staying on the tensor cores, which the fp32 path needs at d >= 64
    to stay memory-bound; plain 'tf32' (10-bit mantissa) is finer than the bf16/fp16 rounding of
    the result, so half-precision images use it. Other GPUs get 'ieee'. The interpreter ignores it.
    """
    if device.type != "cuda" or torch.version.hip is not None:
        return "ieee"
    major, _ = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if major < 8:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 1 on CPU)."""
    if device.type != "cuda":
        return 1
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def device_guard(device: torch.device):
    """Make `device` current while launching: triton launches on the current CUDA device."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def patch_major_to_channel_major(t: torch.Tensor, p: int, C: int) -> torch.Tensor:
    """Reorder the last dim of `t` (D = p*p*C) from MAE's (p, p, C) order to (C, p, p).

    The kernels walk a patch in (C, p, p) order because that order is contiguous in NCHW memory
    (a row of p pixels of one channel), which turns each tile load into runs of p contiguous
    elements instead of a gather with stride H*W. The sum over D in the projections does not
    care about order, so permuting the (small) basis and mean once per call is all it takes.
    """
    lead = t.shape[:-1]
    return t.reshape(*lead, p, p, C).movedim(-1, -3).reshape(*lead, C * p * p).contiguous()


def has_custom_op() -> bool:
    """torch.library.custom_op (torch >= 2.4): lets torch.compile trace around the kernels."""
    return hasattr(torch, "library") and hasattr(torch.library, "custom_op")
