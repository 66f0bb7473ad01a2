"""Module faces: how a model meets a kernel (it never reads kernel internals).

Each face holds no parameters, so swapping a kernel changes no state_dict key, and decides once,
at construction, per device type, through kernels.dispatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import adaln_norm as _adaln
from .dispatch import kernel_runs


def adaln_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Eager LayerNorm (no affine) then modulate, in the inputs' dtypes: what the unfused blocks
    have always computed (bit for bit), so turning the fused kernel off changes nothing."""
    y = F.layer_norm(x, x.shape[-1:], eps=eps)
    return y * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class AdaLNLayerNorm(nn.Module):
    """LN(x) * (1 + scale) + shift for x (B, T, C), shift / scale (B, C): the fused Triton kernel
    when `fused` and engine.kernels lets it run on the input's device, else `adaln_reference`."""

    def __init__(self, eps: float = 1e-6, fused: bool = False, kernels: str = "auto",
                 act_dtype: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.on = {t: bool(fused) and kernel_runs(kernels, t, _adaln._adaln_ln_fwd_kernel) for t in ("cpu", "cuda")}
        self.act_dtype = act_dtype
        """Fused kernel only: under autocast write y in the autocast dtype (model.adaln_act_dtype)."""

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.on.get(x.device.type, False):
            out = None
            if self.act_dtype and torch.is_autocast_enabled(x.device.type):
                out = torch.get_autocast_dtype(x.device.type)
            return _adaln.adaln_layernorm(x, shift, scale, self.eps, out_dtype=out)
        return adaln_reference(x, shift, scale, self.eps)

    def extra_repr(self) -> str:
        return (f"eps={self.eps}, fused_on={[t for t, v in self.on.items() if v]}"
                + (", act_dtype=True" if self.act_dtype else ""))
