"""The one place that maps engine.kernels ('auto' | 'triton' | 'reference') to what runs.

Methods ask `resolve_kernels` for their device (it refuses a 'triton' that cannot run, with the
fix in the message); the model's Module faces ask `kernel_runs` per device type once, when they
are built, so a forward reads a plain dict (torch.compile guards on it instead of tracing here).
"""

from __future__ import annotations

import os

import torch

from . import triton_available
from ._common import HAS_TRITON, is_interpreted

MODES = ("auto", "triton", "reference")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"kernels={mode!r}; choose auto, triton or reference")


def resolve_kernels(mode: str, device: torch.device | str) -> str:
    """'triton' or 'reference' for `device`.

    'auto': Triton on CUDA (when triton imports), the reference on CPU. 'triton' on CPU runs the
    kernels in the Triton interpreter and needs TRITON_INTERPRET=1 set before triton is imported.
    """
    device = torch.device(device)
    _check_mode(mode)
    if mode == "reference":
        return "reference"
    have_triton = triton_available()
    if mode == "auto":
        return "triton" if (device.type == "cuda" and have_triton) else "reference"
    if not have_triton:
        raise RuntimeError("kernels='triton' was asked for but triton is not importable here; "
                           "install triton or use --kernels=reference")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels='triton' on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 "
                           "(before starting Python) or use --kernels=reference")
    return "triton"


def kernel_runs(mode: str, device_type: str, kernel) -> bool:
    """Whether `kernel` (@triton.jit) runs for tensors on `device_type` under `mode`: as
    `resolve_kernels` decides, and only where this process defined it runnable (compiled for
    CUDA, or interpreted for CPU). Never raises: a method resolving the same mode raises first."""
    _check_mode(mode)
    if mode == "reference" or not HAS_TRITON:
        return False
    interpreted = is_interpreted(kernel)
    if device_type == "cuda":
        return not interpreted
    return device_type == "cpu" and mode == "triton" and interpreted
