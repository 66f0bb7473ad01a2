"""DeepSpeed backend: ZeRO 1-3, bf16, gradient accumulation and clipping, FusedAdam / FusedLamb on CUDA.

The DeepSpeed JSON is generated from our config (`ds_config`), so there is one source of truth; a
user JSON (`engine.deepspeed_config`) may override any key. Launch with `deepspeed train.py ...` or
`torchrun train.py ...` and `--engine.backend=deepspeed`.

Batch semantics: global batch = data.batch_size (micro) x engine.grad_accum x world size, and the
learning rate is optim.blr x global batch / 256 (set per step by our schedule, not DeepSpeed's).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ..config import Config, ConfigError
from .collectives import RankCollectives
from .optim import param_groups

DS_TAG = "state"


def deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


# Our loop owns these: a second optimizer or schedule in the JSON would fight ours silently.
_OWNED_KEYS = ("optimizer", "scheduler")


def ds_config(cfg: Config, world_size: int, on_cuda: bool) -> dict:
    """The DeepSpeed JSON implied by our config (plus the user's override file, if any)."""
    c = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.engine.grad_accum,
        "train_batch_size": cfg.global_batch(world_size),
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.engine.zero_stage, "overlap_comm": on_cuda,
                              "contiguous_gradients": True, "reduce_bucket_size": 5e7},
        "bf16": {"enabled": on_cuda and cfg.engine.precision in ("auto", "bf16")},
        # Accumulate micro-batch gradients in fp32 even when the weights are bf16: summing many
        # micro-batches in bf16 loses the small ones (silent degradation with large accumulation).
        "data_types": {"grad_accum_dtype": "fp32"},
        "steps_per_print": 1 << 30,  # our logger prints; DeepSpeed's own lines would duplicate it
        "wall_clock_breakdown": False,
    }
    if cfg.optim.name == "lamb":
        # DeepSpeed lists no LAMB among ZeRO's tested optimizers and refuses one without this.
        c["zero_allow_untested_optimizer"] = True
    if cfg.engine.deepspeed_config:
        path = Path(cfg.engine.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"engine.deepspeed_config={path}: no such file")
        try:
            user = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"engine.deepspeed_config={path}: not valid JSON ({e})") from None
        if not isinstance(user, dict):
            raise ConfigError(f"engine.deepspeed_config={path}: expected a JSON object")
        owned = [k for k in _OWNED_KEYS if k in user]
        if owned:
            raise ConfigError(f"engine.deepspeed_config={path} sets {owned}: the optimizer and learning-rate "
                             "schedule come from the optim.* settings; remove those keys")
        deep_update(c, user)
    # The data stream and the lr rule read data.batch_size / engine.grad_accum, so a JSON that
    # disagrees would train on one batch size and schedule for another.
    want = {"train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": cfg.engine.grad_accum,
            "train_batch_size": cfg.global_batch(world_size)}
    bad = {k: c.get(k) for k, v in want.items() if c.get(k) != v}
    # The loop decides on the EMA and on where weights are saved from engine.zero_stage.
    if c.get("zero_optimization", {}).get("stage") != cfg.engine.zero_stage:
        raise ConfigError(f"engine.deepspeed_config sets zero_optimization.stage="
                         f"{c['zero_optimization'].get('stage')}; set --engine.zero_stage instead")
    if bad:
        raise ConfigError(f"engine.deepspeed_config sets {bad}, but this run has {want} (micro x grad_accum x "
                         f"{world_size} ranks); set --data.batch_size / --engine.grad_accum instead")
    return c


def _init_distributed(on_cuda: bool) -> None:
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        # Single process without a launcher: give torch.distributed a one-rank world.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")


def _lamb(model, cfg: Config, groups: list[dict], lr: float, betas, on_cuda: bool):
    """DeepSpeed's FusedLamb on CUDA; timm's Lamb where it cannot run (CPU, or its JIT build fails).

    FusedLamb adapts every tensor, its trust ratio clamped to [0.01, 10]; timm's, as configured
    here, adapts the weight matrices unclamped: close, not equal. DeepSpeed clips the gradients
    (gradient_clipping = optim.clip_grad), so FusedLamb's own clipping stays off (max_grad_norm=0).
    """
    from .optim import LAMB_EPS, lamb_param_groups, timm_lamb

    # ZeRO hands the optimizer flat partitions of many tensors, so the norms behind the trust
    # ratio are taken per partition, not per layer (deepspeedai/DeepSpeed#490).
    warnings.warn("optim.name=lamb under DeepSpeed ZeRO: the trust ratio is computed per flattened ZeRO "
                  "partition, not per layer, so it is not the LAMB of a single device; compare a short "
                  "run against engine.backend=single before relying on it", stacklevel=3)

    if on_cuda:
        try:
            from deepspeed.ops.lamb import FusedLamb
            return FusedLamb(groups, lr=lr, betas=betas, eps=LAMB_EPS, max_grad_norm=0.0)
        except Exception as e:  # its JIT build needs nvcc matching torch's CUDA
            warnings.warn(f"DeepSpeed FusedLamb unavailable ({type(e).__name__}: {e}); using timm's Lamb",
                          stacklevel=3)
    return timm_lamb(lamb_param_groups(model, cfg.optim.weight_decay), lr, betas)


class DeepSpeedBackend(RankCollectives):
    """Same surface as engine.single_device.SingleDevice (backward / step / state_dict /
    load_state_dict), plus the collectives the loop uses across ranks."""

    save_on_all_ranks = True  # DeepSpeed's sharded save is collective

    def __init__(self, cfg: Config, model: torch.nn.Module, lr: float):
        try:
            import deepspeed
        except ImportError as e:
            raise RuntimeError("engine.backend=deepspeed needs DeepSpeed: pip install 'ldae-fast[scale]'") from e
        import torch.distributed as dist

        on_cuda = next(model.parameters()).is_cuda
        _init_distributed(on_cuda)
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0
        if on_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        self.cfg = cfg
        self.config = ds_config(cfg, self.world_size, on_cuda)
        groups = param_groups(model, cfg.optim.weight_decay)
        # The model's parameters per group: DeepSpeed swaps each group's list for its flat buffer.
        self.groups = [{"params": list(g["params"])} for g in groups]
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        opt = None
        if cfg.optim.name == "lamb":
            opt = _lamb(model, cfg, groups, lr, betas, on_cuda)
        elif on_cuda:
            try:
                from deepspeed.ops.adam import FusedAdam
                opt = FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True)
            except Exception as e:  # its JIT build needs nvcc matching torch's CUDA
                warnings.warn(f"DeepSpeed FusedAdam unavailable ({type(e).__name__}: {e}); using "
                              "torch.optim.AdamW(fused=True)", stacklevel=2)
                opt = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        if opt is None:
            opt = torch.optim.AdamW(groups, lr=lr, betas=betas)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=self.config)
        self.model = self.engine
        self.module = model
        # The single-device format of the state (zero_state.py) is written for AdamW.
        self.consolidated = cfg.engine.ckpt_consolidated and cfg.optim.name != "lamb"

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def step(self, lr: float) -> torch.Tensor:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return torch.zeros(())
        # Stays where DeepSpeed put it: the loop sums norms on the device and reads them at log time.
        return norm.detach().float() if torch.is_tensor(norm) else torch.tensor(float(norm))

    def state_dict(self) -> dict:
        """Collective. With engine.ckpt_consolidated: the whole fp32 model and AdamW state in the
        single-device format (zero_state.gather), which any backend and rank count loads.
        Otherwise ZeRO-1/2 in fp32 keep the full trained weights on every rank; under ZeRO-3 each
        rank holds a shard, and under bf16 the module holds rounded copies of the fp32 masters: then
        the weights come from the sharded files (consolidated_model_state) and state.pt stays small."""
        if self.consolidated:
            from . import zero_state

            model, optimizer = zero_state.gather(self.module, self.optimizer, self.groups)
            return {"model": model, "optimizer": optimizer, "world_size": self.world_size}
        full = self.cfg.engine.zero_stage < 3 and not self.config.get("bf16", {}).get("enabled", False)
        model = self.module.state_dict() if full else None
        return {"model": model, "optimizer": None, "world_size": self.world_size}

    def save_extra(self, tmp_dir: Path) -> None:
        self.engine.save_checkpoint(str(Path(tmp_dir) / "ds"), tag=DS_TAG)

    def load_state_dict(self, st: dict, ckpt_dir: Path) -> None:
        """DeepSpeed's own files when this engine's shape wrote them (same ranks and ZeRO stage),
        else the single-device format (a single-device or ddp checkpoint, or a consolidated
        DeepSpeed one) cut into this engine's partitions (engine/reshape.py checked that it is there)."""
        ds_dir = Path(ckpt_dir) / "ds"
        saved = (st.get("config") or {}).get("engine") or {}
        native = ((ds_dir / DS_TAG).is_dir() and saved.get("backend") == "deepspeed"
                  and int(st.get("world_size") or 0) == self.world_size
                  and int(saved.get("zero_stage", self.cfg.engine.zero_stage)) == self.cfg.engine.zero_stage)
        if not native and st.get("model") is not None and st.get("optimizer") is not None:
            from . import zero_state

            zero_state.scatter(self.module, self.optimizer, self.groups, st["model"], st["optimizer"])
            return
        if not (ds_dir / DS_TAG).is_dir():
            raise FileNotFoundError(f"{ckpt_dir} has no DeepSpeed state (ds/{DS_TAG}) and no whole model and "
                                    "optimizer state in state.pt")
        from .checkpoint import weights_only_loads

        with weights_only_loads(_ds_safe_globals()):  # DeepSpeed's loader asks for weights_only=False
            self.engine.load_checkpoint(str(ds_dir), tag=DS_TAG, load_optimizer_states=True,
                                        load_lr_scheduler_states=False)

    @property
    def device(self) -> torch.device:
        """Where the process group lives, so where the collectives' tensors go: the engine's device."""
        return self.engine.device


# Plain-data classes DeepSpeed pickles into its optimizer state: a loss-scale record, an int enum
# and a (start, numel) pair. Allowed by name; nothing else in its files may be an object.
_DS_SAFE = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
            "deepspeed.utils.tensor_fragment.fragment_address")


def _ds_safe_globals() -> tuple:
    import importlib

    out = []
    for name in _DS_SAFE:
        mod, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError):
            continue
    return tuple(out)


def consolidated_model_state(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from a (possibly ZeRO-3 sharded) checkpoint of ours."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .checkpoint import weights_only_loads

    with weights_only_loads(_ds_safe_globals()):
        return get_fp32_state_dict_from_zero_checkpoint(str(Path(ckpt_dir) / "ds"), tag=DS_TAG)
