"""One training step captured as a CUDA graph and replayed: every kernel of the step in one
launch, for static shapes, when the profile says launch overhead matters (the bench's
'd+stepgraph' variant measures it).

The step function must keep its shapes, do no host sync (no .item(), no data-dependent shapes)
and use a capturable optimizer (torch.optim.AdamW(..., capturable=True) or fused=True with
capturable=True). It should begin with `optimizer.zero_grad(set_to_none=True)`, so the backward
inside the graph assigns the gradients into the graph's own memory instead of accumulating.
Inputs are copied into static buffers before each replay; the outputs are the captured tensors,
overwritten by the next replay. Host-side values the step reads while being captured (a Python
int seed, a learning rate as a float) are frozen into the graph: keep them on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import SpeedSwitchError


def check_cuda_graphs(tensors: Sequence[torch.Tensor]) -> None:
    """One line, exit 2, where a CUDA graph cannot be captured (no CUDA, inputs off the GPU)."""
    if not torch.cuda.is_available():
        raise SpeedSwitchError("CUDA graphs need a CUDA device; none is present (run the step eagerly)")
    off = [t.device.type for t in tensors if not t.is_cuda]
    if off:
        raise SpeedSwitchError(f"CUDA graphs need a CUDA device for every input; got {off[0]} tensors")


class GraphedStep:
    """`fn(*inputs)` captured once (after `warmup` eager calls on a side stream, which also
    initialises optimizer state and picks the kernels' launch configurations) and replayed."""

    def __init__(self, fn: Callable[..., object], example_inputs: Sequence[torch.Tensor], warmup: int = 3) -> None:
        check_cuda_graphs(example_inputs)
        self.static = tuple(t.detach().clone() for t in example_inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.static)

    def __call__(self, *inputs: torch.Tensor) -> object:
        for buf, x in zip(self.static, inputs):
            buf.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.outputs
