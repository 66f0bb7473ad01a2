"""Regional torch.compile of the transformer blocks."""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module, backend: str = "inductor", mode: str = "default") -> int:
    """Regional compilation: torch.compile each transformer block in place, nothing else.

    Blocks share one code object and shape, so Dynamo compiles once and reuses the graph for
    every block (fast start-up, unlike compiling the whole model), while the custom Triton ops
    and the glue between blocks stay eager. mode='reduce-overhead' records each block's kernels
    as a CUDA graph (the caller marks step boundaries with `mark_step_begin`). Returns the number
    of blocks compiled.
    """
    n = 0
    kwargs = {"backend": backend}
    if mode != "default" and backend == "inductor":  # modes are inductor's; other backends take none
        kwargs["mode"] = mode
    for m in model.modules():
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for blk in blocks:
                blk.compile(**kwargs)
                n += 1
    return n


def mark_step_begin() -> None:
    """Tell CUDA-graph trees a new training step starts, so the previous step's graph outputs
    may be overwritten (without it, mode='reduce-overhead' keeps them alive or raises)."""
    fn = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
    if fn is not None:
        fn()
