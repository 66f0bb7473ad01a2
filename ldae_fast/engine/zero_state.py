"""DeepSpeed ZeRO state <-> the single-device checkpoint format, on any rank count.

The single-device and ddp backends checkpoint the whole model (`model`) and the torch optimizer's
state_dict (`optimizer`: per parameter, numbered in engine/optim.py's group order, `step`,
`exp_avg`, `exp_avg_sq`). DeepSpeed keeps the fp32 master weights and the Adam moments as flat
per-rank partitions: ZeRO-1/2 one flat buffer per parameter group split across ranks, ZeRO-3 each
parameter split across ranks. `gather` assembles the whole tensors (one reduce onto rank 0 per
parameter and state key; every rank takes part, only rank 0 keeps them, on the CPU) into the
single-device format,
which the DeepSpeed backend writes into state.pt beside its own sharded files. `scatter` cuts
such a state back into this engine's partitions, whatever rank count or ZeRO stage wrote it. So a
checkpoint moves between one device, ddp and ZeRO 1-3 in any direction, on any rank count.

Supported optimizers: AdamW (torch's, or DeepSpeed's FusedAdam, which keeps `step` per group).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _inner(ds_optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed runs on its flat fp32 partitions."""
    return ds_optimizer.optimizer


def _flats(ds_optimizer: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions, one per (sub-)group: the tensors the torch optimizer steps
    and keys its state on."""
    if hasattr(ds_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(ds_optimizer.fp32_partitioned_groups_flat)
    return [g["params"][0] for g in _inner(ds_optimizer).param_groups]


def _where(ds_optimizer: Any, p: torch.nn.Parameter, world: int, rank: int
           ) -> tuple[int, int, int, int] | None:
    """(group, start in this rank's flat partition, start in the flattened parameter, length) of
    the piece of `p` this rank holds; None when it holds none."""
    if hasattr(p, "ds_id"):  # ZeRO-3: parameter p split into `world` equal (padded) parts
        group, offset, numel = ds_optimizer.grad_position[ds_optimizer.get_param_id(p)]
        part = p.ds_tensor.ds_numel
        numel = max(0, min(numel, p.ds_numel - rank * part))
        return (group, offset, rank * part, numel) if numel > 0 else None
    m = getattr(p, "_hp_mapping", None)
    if m is None:  # ZeRO-1/2: this rank's flat partition holds no element of p
        return None
    return m.param_group_index, m.hp_fragment_address.start, m.lp_fragment_address.start, m.lp_fragment_address.numel


def _source(ds_optimizer: Any, group: int, key: str | None) -> torch.Tensor:
    flat = _flats(ds_optimizer)[group]
    return flat if key is None else _inner(ds_optimizer).state[flat][key]


def _gather_one(ds_optimizer: Any, p: torch.nn.Parameter, key: str | None, world: int, rank: int
                ) -> torch.Tensor | None:
    n = getattr(p, "ds_numel", p.numel())
    shape = getattr(p, "ds_shape", p.shape)
    ref = _flats(ds_optimizer)[0]
    buf = torch.zeros(n, dtype=torch.float32, device=ref.device)
    w = _where(ds_optimizer, p, world, rank)
    if w is not None:
        g, hp, lp, numel = w
        buf.narrow(0, lp, numel).copy_(_source(ds_optimizer, g, key).narrow(0, hp, numel))
    if world > 1:
        dist.reduce(buf, dst=0)  # each element is held by exactly one rank
    return buf.view(shape).cpu() if rank == 0 else None


def _step_of(ds_optimizer: Any) -> float:
    inner = _inner(ds_optimizer)
    for flat in _flats(ds_optimizer):
        if "step" in inner.state.get(flat, {}):
            return float(inner.state[flat]["step"])
    return next((float(g["step"]) for g in inner.param_groups if "step" in g), 0.0)


def _adamw_groups(ds_optimizer: Any, groups: list[dict]) -> list[dict]:
    """torch AdamW's param_groups for `groups` (engine/optim.py's order), with the hyperparameters
    the engine ran with."""
    defaults = torch.optim.AdamW([torch.zeros(1)]).param_groups[0]
    out, first, have = [], 0, _inner(ds_optimizer).param_groups
    for i, g in enumerate(groups):
        inner = have[min(i, len(have) - 1)]
        hyper = {k: v for k, v in defaults.items() if k != "params"}
        hyper.update({k: inner[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad") if k in inner})
        out.append({**hyper, "params": list(range(first, first + len(g["params"])))})
        first += len(g["params"])
    return out


def gather(module: torch.nn.Module, ds_optimizer: Any, groups: list[dict]) -> tuple[dict, dict] | tuple[None, None]:
    """Collective: (model state_dict with the fp32 master weights, torch AdamW state_dict) of the
    whole model on rank 0, (None, None) on the others. `groups`: the parameter groups the engine's
    optimizer was built from (engine/optim.py's param_groups)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    keys = [k for k in _MOMENTS if any(k in s for s in _inner(ds_optimizer).state.values())]
    full: dict[int, torch.Tensor] = {}
    state: dict[int, dict[str, torch.Tensor]] = {}
    step = torch.tensor(_step_of(ds_optimizer), dtype=torch.float32)
    i = 0
    for g in groups:
        for p in g["params"]:
            full[id(p)] = _gather_one(ds_optimizer, p, None, world, rank)
            if keys:
                state[i] = {"step": step.clone(), **{k: _gather_one(ds_optimizer, p, k, world, rank) for k in keys}}
            i += 1
    entries = module.state_dict(keep_vars=True)
    frozen = [v for v in entries.values() if hasattr(v, "ds_id") and id(v) not in full]
    if frozen:  # ZeRO-3 partitions parameters without gradients too: gathered whole (collective)
        import deepspeed

        with deepspeed.zero.GatheredParameters(frozen):
            if rank == 0:
                full.update({id(v): v.detach().float().cpu().clone() for v in frozen})
    if rank != 0:
        return None, None
    model: dict[str, torch.Tensor] = {}
    for name, v in entries.items():
        model[name] = full[id(v)] if id(v) in full else v.detach().cpu().clone()
    return model, {"state": state, "param_groups": _adamw_groups(ds_optimizer, groups)}


def scatter(module: torch.nn.Module, ds_optimizer: Any, groups: list[dict], model: dict[str, torch.Tensor],
            optimizer: dict | None) -> None:
    """Load a single-device state (`model` state_dict, torch optimizer state_dict or None) into
    this engine's partitions: module weights, fp32 masters, Adam moments and step."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    params = [p for g in groups for p in g["params"]]
    names = {id(v): k for k, v in module.state_dict(keep_vars=True).items()}
    zero3 = any(hasattr(p, "ds_id") for p in params)
    # The module's own (low-precision under bf16) weights and buffers.
    if zero3:
        import deepspeed

        every = list(module.parameters())  # those without gradients are partitioned too
        with deepspeed.zero.GatheredParameters(every, modifier_rank=0):
            with torch.no_grad():
                for p in every:
                    p.copy_(model[names[id(p)]].to(p))
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in model:
                    b.copy_(model[name].to(b))
    else:
        module.load_state_dict(model)
    inner = _inner(ds_optimizer)
    saved = (optimizer or {}).get("state", {})
    keys = sorted({k for s in saved.values() for k in s if k in _MOMENTS})
    for flat in _flats(ds_optimizer):  # Adam's state is created lazily: make it for the moments loaded
        st = inner.state[flat]
        for k in keys:
            st.setdefault(k, torch.zeros_like(flat))
    step = next((float(s["step"]) for s in saved.values() if "step" in s), None)
    with torch.no_grad():
        for i, p in enumerate(params):
            w = _where(ds_optimizer, p, world, rank)
            if w is None:
                continue
            g, hp, lp, numel = w
            sources = {None: model[names[id(p)]]} | {k: saved[i][k] for k in keys if i in saved}
            for key, value in sources.items():
                piece = value.detach().reshape(-1).narrow(0, lp, numel)
                _source(ds_optimizer, g, key).narrow(0, hp, numel).copy_(piece)
    if step is not None:
        if isinstance(inner, torch.optim.AdamW):
            g = inner.param_groups[0]
            on_device = g.get("fused") or g.get("capturable")  # their step lives with the weights
            for flat in _flats(ds_optimizer):
                inner.state[flat]["step"] = torch.tensor(step, dtype=torch.float32,
                                                         device=flat.device if on_device else None)
        else:  # DeepSpeed's FusedAdam counts steps per group
            for g in inner.param_groups:
                g["step"] = int(step)


__all__ = ["gather", "scatter"]
