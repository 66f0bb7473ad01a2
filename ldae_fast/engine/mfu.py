"""Model FLOPs utilisation: the analytic training FLOPs of a step against the GPU's bf16 peak.

Shared by the training log and bench/train_step.py, so both report the same number.
Each method counts its own training FLOPs (MethodSpec.train_flops: every matmul at 2 FLOPs per
multiply-add). Recomputation under activation checkpointing is not counted: MFU measures useful
model work, whatever the run spends on top.
"""

from __future__ import annotations

import re

# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets, matched on
# torch.cuda.get_device_name(). Order matters: the more specific names come first.
PEAK_TFLOPS_BF16: list[tuple[str, str, float]] = [
    (r"GH200", "GH200", 989.0),
    (r"H200 NVL", "H200 NVL", 835.0),
    (r"H200", "H200 SXM", 989.0),
    (r"H100 NVL", "H100 NVL", 835.0),
    (r"H100 PCIe", "H100 PCIe", 756.0),
    (r"H100", "H100 SXM", 989.0),
    (r"A100", "A100", 312.0),
    (r"L40S", "L40S", 362.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bA10\b", "A10", 125.0),
]


def peak_tflops_for(gpu_name: str) -> tuple[float | None, str]:
    """(peak bf16 dense TFLOP/s, which table entry matched) for a CUDA device name."""
    for pattern, label, peak in PEAK_TFLOPS_BF16:
        if re.search(pattern, gpu_name):
            return peak, label
    return None, "unknown GPU"


def train_flops(cfg) -> tuple[float, float]:
    """(forward, training) FLOPs per image (or clip) of cfg's method: MethodSpec.train_flops."""
    from ..methods import spec_for

    return spec_for(cfg).train_flops(cfg)
