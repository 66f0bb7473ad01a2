"""Optimizer and the parameter EMA (the learning-rate schedule is ldae_fast/lr_schedule.py)."""

from __future__ import annotations

import inspect

import torch

from ..config import Config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings' 1-D tensors and the class token (MAE's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("cls_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: torch.nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """AdamW, the fused CUDA implementation when the parameters live on CUDA."""
    kwargs = dict(lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    on_cuda = next(model.parameters()).is_cuda
    if on_cuda and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), **kwargs)


# Large-batch runs (a global batch of 4k-32k) are where LAMB's per-layer trust ratio pays; eps as
# in timm's Lamb and the LAMB paper's BERT runs. DeepSpeed's FusedLamb gets the same value.
LAMB_EPS = 1e-6


def lamb_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """`param_groups`, with the trust ratio on the weight matrices whatever the weight decay:
    timm's Lamb adapts only groups with weight decay unless told, and the paper's recipe has none,
    which would make 'lamb' plain Adam. Biases, norms and the class token stay unadapted."""
    decay, no_decay = param_groups(model, weight_decay)
    return [{**decay, "always_adapt": True}, {**no_decay, "always_adapt": False}]


def timm_lamb(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """timm's Lamb without its own gradient clipping: the loop clips to optim.clip_grad first."""
    from timm.optim import Lamb

    return Lamb(groups, lr=lr, betas=betas, eps=LAMB_EPS, max_grad_norm=None)


def build_optimizer(model: torch.nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """optim.name: 'adamw' (`build_adamw`) or 'lamb' (timm's Lamb, one device)."""
    if cfg.optim.name == "lamb":
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        return timm_lamb(lamb_param_groups(model, cfg.optim.weight_decay), lr, betas)
    return build_adamw(model, cfg, lr)


class EMA:
    """Exponential moving average of the parameters (buffers are copied), kept in float32.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the n updates so far: with a fixed
    0.9999 a short run's EMA would still be, to four digits, the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        params = dict(model.named_parameters())
        avg_s, avg_v = [], []
        for k, v in model.state_dict().items():
            if k in params and v.dtype.is_floating_point:
                avg_s.append(self.shadow[k])
                avg_v.append(v.float())
            else:
                self.shadow[k].copy_(v)
        if avg_s:
            # One multi-tensor kernel per dtype/device group instead of a launch per parameter:
            # a ViT-L pair has ~600 tensors, and per-tensor launches cost more than the math.
            torch._foreach_lerp_(avg_s, avg_v, 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, loadable into the model (the update count is kept aside)."""
        return self.shadow

    def load_state_dict(self, sd: dict[str, torch.Tensor], updates: int = 0) -> None:
        for k, v in sd.items():
            self.shadow[k].copy_(v)
        self.updates = updates
