"""LARS (You, Gitman, Ginsburg 2017) as the MAE linear-probe protocol uses it.

Update of a matrix-shaped parameter w with gradient g (weight decay wd, trust coefficient eta):
    u = g + wd * w
    u = u * (eta * |w| / |u|)        (only when |w| > 0 and |u| > 0, else unscaled)
    m = momentum * m + u
    w = w - lr * m
Parameters with one dimension (biases, norm scales) skip both the weight decay and the trust
ratio and take the plain momentum-SGD step: their norm says nothing about the scale of the
layer, and a zero-initialised bias would otherwise never move.
"""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS: need lr >= 0, weight_decay >= 0, 0 <= momentum < 1, trust_coefficient > 0; "
                f"got lr={lr}, weight_decay={weight_decay}, momentum={momentum}, "
                f"trust_coefficient={trust_coefficient}"
            )
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            mom, eta = group["momentum"], group["trust_coefficient"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad
                if p.ndim > 1:
                    if wd != 0:
                        u = u.add(p, alpha=wd)
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(u)
                    # torch.where keeps the ratio on the device: no host sync per parameter.
                    ratio = torch.where((w_norm > 0) & (u_norm > 0),
                                        eta * w_norm / u_norm.clamp_min(1e-30),
                                        torch.ones_like(w_norm))
                    u = u * ratio
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(mom).add_(u)
                p.add_(buf, alpha=-lr)
        return loss
