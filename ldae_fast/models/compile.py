"""Regional torch.compile of the transformer blocks."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels._common import version_tuple


def compile_blocks(model: nn.Module, backend: str = "inductor", mode: str = "default") -> int:
    """Regional compilation: torch.compile each transformer block in place, nothing else.

    Blocks share one code object and shape, so Dynamo (torch >= 2.5, which inlines module
    instances) compiles once and reuses the graph for every block (fast start-up, unlike
    compiling the whole model), while the custom Triton ops and the glue between blocks stay
    eager; on older torch each block gets its own graph and the cache limit is raised to fit.
    The modes in config.CUDA_GRAPH_MODES record each block's kernels as CUDA graphs (the caller
    marks step boundaries with `mark_step_begin`). Returns the number of blocks compiled.
    """
    kwargs = {"backend": backend}
    if mode != "default" and backend == "inductor":  # modes are inductor's; other backends take none
        kwargs["mode"] = mode
    blocks = [blk for m in model.modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)
              for blk in m.blocks]
    _room_for_one_graph_per_block(len(blocks))
    for blk in blocks:
        blk.compile(**kwargs)
    return len(blocks)


def _torch_version() -> tuple[int, int]:
    return version_tuple(torch.__version__)


def _room_for_one_graph_per_block(n_blocks: int) -> None:
    """Before torch 2.5 Dynamo guards on each module instance (inline_inbuilt_nn_modules off by
    default), so every block compiles its own graph; past cache_size_limit (8) the rest would
    silently run eager. Raise the limit to fit them (x2: with and without autocast). From 2.5 the
    blocks share one graph (and the setting was later renamed), so nothing is touched there."""
    if _torch_version() >= (2, 5):
        return
    cfg = torch._dynamo.config
    need = 2 * n_blocks + 8
    for name in ("cache_size_limit", "accumulated_cache_size_limit"):
        if getattr(cfg, name, need) < need:
            setattr(cfg, name, need)


def mark_step_begin() -> None:
    """Tell CUDA-graph trees a new training step starts, so the previous step's graph outputs
    may be overwritten (without it, mode='reduce-overhead' keeps them alive or raises)."""
    fn = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
    if fn is not None:
        fn()
