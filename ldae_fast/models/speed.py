"""Speed switches applied to a built network, each off by default (model.bf16_residual,
model.adaln_act_dtype, model.fp8): one place that both networks (l-DAE's, DiffMAE's) pass through,
so no block or stack constructor grows a flag per switch.

- bf16 residual stream: under autocast the tokens entering each block stack are cast to the
  autocast dtype, so the residual adds and the tensors saved for the backward are half the bytes.
  Without it the stream is float32 (the patch embedding's sum with the float32 position code), and
  every block reads and writes it in float32. LayerNorm statistics stay float32 either way
  (autocast runs layer_norm in float32; the fused kernel computes in float32), and the loss is
  computed outside autocast in float32. Outside autocast (fp32 training) it changes nothing.
- adaLN output in the activation dtype: the fused adaLN LayerNorm kernel (model.fused_adaln)
  writes its output in the autocast dtype, what the next Linear reads, instead of the residual's
  float32 that autocast then casts (one float32 write and read fewer per norm).
- FP8 linears (torchao's float8 training, 'rowwise' or 'tensorwise' scaling) for the blocks'
  attention projections and MLPs, an optional extra: torchao is not a dependency
  (docs/speed.md: how a wheel matching the device's torch travels with a lent GPU run).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SpeedSwitchError
from ..kernels.modules import AdaLNLayerNorm

__all__ = ["SpeedSwitchError", "apply_speed_switches", "autocast_dtype", "set_adaln_act_dtype",
           "set_bf16_residual", "set_fp8", "stacks"]

FP8_RECIPES = ("rowwise", "tensorwise")
# The blocks' Linears FP8 replaces; embeddings, adaLN modulations and the output head stay bf16.
FP8_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "cross.q", "cross.kv", "cross.proj")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active on device_type, or None outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _to_activation_dtype(_module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    dt = autocast_dtype(x.device.type)
    if dt is None or x.dtype == dt or not x.is_floating_point():
        return None
    return (x.to(dt), *args[1:])


def stacks(model: nn.Module) -> list[nn.ModuleList]:
    """Every block stack of the network (the `blocks` ModuleList of an encoder or a decoder)."""
    return [m.blocks for m in model.modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)]


def set_bf16_residual(model: nn.Module) -> int:
    """Cast the tokens entering each stack's first block to the autocast dtype (a forward pre-hook;
    inside a stack the residual then stays in it). Returns the number of stacks."""
    n = 0
    for blocks in stacks(model):
        if len(blocks):
            blocks[0].register_forward_pre_hook(_to_activation_dtype)
            n += 1
    return n


def set_adaln_act_dtype(model: nn.Module) -> int:
    """Every adaLN norm's fused kernel writes the autocast dtype. Returns how many norms."""
    norms = [m for m in model.modules() if isinstance(m, AdaLNLayerNorm)]
    for m in norms:
        m.act_dtype = True
    return len(norms)


def _torchao_float8():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        return None
    return Float8LinearConfig, convert_to_float8_training


def set_fp8(model: nn.Module, recipe: str) -> int:
    """Swap the blocks' Linears for torchao's Float8Linear with `recipe` scaling. Returns how many."""
    if recipe not in FP8_RECIPES:
        raise SpeedSwitchError(f"model.fp8={recipe!r}: choose one of {', '.join(FP8_RECIPES)} (or '' for off)")
    ao = _torchao_float8()
    if ao is None:
        raise SpeedSwitchError(
            f"model.fp8={recipe!r} needs torchao (an optional extra: a wheel matching torch {torch.__version__}, "
            "docs/speed.md); it is not installed")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SpeedSwitchError(f"model.fp8={recipe!r} needs a CUDA GPU with FP8 matrix units (sm_89 or newer)")
    config_cls, convert = ao
    chosen: list[str] = []

    def pick(mod: nn.Module, fqn: str) -> bool:
        # torchao's FP8 GEMMs want both dimensions divisible by 16.
        ok = (isinstance(mod, nn.Linear) and fqn.endswith(FP8_LINEARS)
              and mod.in_features % 16 == 0 and mod.out_features % 16 == 0)
        if ok:
            chosen.append(fqn)
        return ok

    convert(model, config=config_cls.from_recipe_name(recipe), module_filter_fn=pick)
    return len(chosen)


def apply_speed_switches(model: nn.Module, bf16_residual: bool = False, adaln_act_dtype: bool = False,
                         fp8: str = "") -> nn.Module:
    """The model.* speed switches, in place; returns the model."""
    if bf16_residual:
        set_bf16_residual(model)
    if adaln_act_dtype:
        set_adaln_act_dtype(model)
    if fp8:
        set_fp8(model, fp8)
    return model
