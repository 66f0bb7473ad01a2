"""How a network runs here: the device a run asks for, the autocast its precision means, and
eval mode for a stretch. One answer for training, evaluation, sampling and the benches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import UsageError


def resolve_device(name: str = "auto", what: str = "--device",
                   error: type[Exception] = UsageError) -> torch.device:
    """'auto' -> cuda when visible, else cpu; 'cpu', 'cuda', 'cuda:N' as named. `what` is the
    flag or config field the name came from, and `error` the user error to raise, naming it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fix = f"--{what.lstrip('-')}=cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"{what}={name!r} but no CUDA device is visible; use {fix}")
    try:
        return torch.device(name)
    except RuntimeError:
        raise error(f"{what}={name!r} is not a device; choose auto, cpu, cuda or cuda:N") from None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for 'bf16', and for 'auto' on CUDA; None (fp32) otherwise: CPU bf16 matmuls are slower
    than fp32 and would only add rounding to the numbers."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_for(device: torch.device, precision: str = "auto"):
    """The context `autocast_dtype` asks for: torch.autocast, or nothing for fp32."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode for the duration, then the caller's mode back (a trainer may call us mid-run)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
