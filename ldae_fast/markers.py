"""Phase markers (NVTX ranges) for Nsight and the torch profiler.

A leaf module: models, methods and the engine all mark their phases with `nvtx_range`, and
the import rule (DESIGN.md) lets models and methods import nothing from the engine, so the
marker lives here rather than in engine/profiling.py (which re-exports it).

`nvtx_range(name)` pushes an NVTX range when CUDA is present, and opens a
`torch.profiler.record_function` range while a StepProfiler is collecting (see
`profiling_started` / `profiling_stopped`), so the phases also show up in the Chrome trace, on CPU
too. Otherwise it does nothing, and inside a torch.compile'd region it does nothing either: a
compiled graph has no host code to mark, and tracing the push/pop would only break the graph.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

# StepProfilers now collecting; nvtx_range pays for record_function only while one is.
_profiling_depth = 0


def profiling_started() -> None:
    global _profiling_depth
    _profiling_depth += 1


def profiling_stopped() -> None:
    global _profiling_depth
    _profiling_depth = max(0, _profiling_depth - 1)


def profiling_active() -> bool:
    return _profiling_depth > 0


@functools.lru_cache(maxsize=1)
def _cuda_present() -> bool:
    # Cached: is_available() queries the driver, and nvtx_range runs several times per step.
    return torch.cuda.is_available()


def _compiling() -> bool:
    # torch.compiler.is_compiling appeared in torch 2.3; Dynamo folds either call to a constant.
    fn = getattr(torch.compiler, "is_compiling", None)
    if fn is None:  # pragma: no cover - older torch
        fn = torch._dynamo.is_compiling
    return bool(fn())


def nvtx_range(name: str) -> contextlib.AbstractContextManager:
    """NVTX push/pop around the body when CUDA is present; a no-op otherwise and when compiling.

    A function that returns a context manager, not a generator-based one: Dynamo before torch 2.5
    cannot trace a @contextmanager generator (a graph break, an error under fullgraph), but it
    folds `_compiling()` and knows `nullcontext`.
    """
    if _compiling():
        return contextlib.nullcontext()
    return _marked(name)


@contextlib.contextmanager
def _marked(name: str) -> Iterator[None]:
    nvtx = _cuda_present()
    rf = torch.profiler.record_function(name) if _profiling_depth > 0 else None
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    if rf is not None:
        rf.__enter__()
    try:
        yield
    finally:
        if rf is not None:
            rf.__exit__(None, None, None)
        if nvtx:
            torch.cuda.nvtx.range_pop()
