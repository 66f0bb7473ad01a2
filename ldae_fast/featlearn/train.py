"""Full-batch gradient descent for both networks, recording the feature-learning metrics."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from . import nets
from .data import TwoPatchData

Progress = Callable[[str], None]


@dataclass
class DiffusionConfig:
    iters: int = 40_000
    lr: float = 0.5
    t: float = 0.2
    m: int = 20
    sigma0: float = 1e-3
    n_eps: int = 0  # 0: exact expectation over eps; > 0: that many sampled draws per step
    n_records: int = 200

    def check(self) -> None:
        _check_common(self.iters, self.lr, self.m, self.sigma0, self.n_records)
        if self.t <= 0:
            raise ValueError(f"diffusion time t must be positive, got {self.t}")
        if self.n_eps < 0:
            raise ValueError(f"n_eps must be >= 0 (0 = closed form), got {self.n_eps}")


@dataclass
class ClassifierConfig:
    iters: int = 500
    lr: float = 0.1
    m: int = 20
    sigma0: float = 1e-3
    n_records: int = 200

    def check(self) -> None:
        _check_common(self.iters, self.lr, self.m, self.sigma0, self.n_records)


def _check_common(iters: int, lr: float, m: int, sigma0: float, n_records: int) -> None:
    if iters < 0:
        raise ValueError(f"iterations must be >= 0, got {iters}")
    if not lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    if m < 1:
        raise ValueError(f"width m must be >= 1, got {m}")
    if not sigma0 > 0:
        raise ValueError(f"init scale sigma0 must be positive, got {sigma0}")
    if n_records < 2:
        raise ValueError(f"n_records must be >= 2, got {n_records}")


def record_steps(iters: int, n_records: int) -> set[int]:
    """Evenly spaced steps plus log-spaced early ones, so fast early dynamics are not missed."""
    steps = set(np.linspace(0, iters, n_records).round().astype(int).tolist())
    # Exact quarter marks, so the table can show whether a run is still moving at its end.
    steps |= {iters * k // 4 for k in range(1, 4)}
    if iters >= 1:
        steps |= set(np.geomspace(1, iters, max(2, n_records // 4)).round().astype(int).tolist())
    return steps


def _nonfinite(what: str, step: int, lr: float) -> FloatingPointError:
    return FloatingPointError(
        f"{what} loss became non-finite at iteration {step} (lr={lr}); lower the learning rate"
    )


def _report(progress: Progress, what: str, step: int, iters: int, loss: torch.Tensor, met: dict) -> None:
    progress(f"  {what} it {step:>6}/{iters}  loss {loss.item():.5g}  "
             f"signal {met['signal']:.4g}  noise {met['noise']:.4g}  ratio {met['ratio']:.4g}")


def _result(cfg, history: list[dict], t0: float, W: torch.Tensor, **extra) -> dict:
    return {"config": asdict(cfg), "history": history, "final": history[-1],
            "seconds": time.perf_counter() - t0, **extra, "W": W}


def train_diffusion(
    data: TwoPatchData,
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    progress_every: int = 0,
) -> dict:
    """GD on the DDPM loss; returns {"config", "history", "final", "seconds", "W"}."""
    cfg.check()
    alpha, beta = nets.schedule(cfg.t)
    x = data.x
    W = nets.init_weights((cfg.m, data.d), cfg.sigma0, generator, x.dtype).to(x.device)
    steps = record_steps(cfg.iters, cfg.n_records)
    history: list[dict] = []
    increases = 0
    t0 = time.perf_counter()
    for step in range(cfg.iters + 1):
        if cfg.n_eps == 0:
            loss, grad = nets.diffusion_loss_and_grad(W, x, alpha, beta)
        else:
            loss, grad = nets.diffusion_loss_and_grad_mc(W, x, alpha, beta, cfg.n_eps, generator)
        lv = loss.item() if (step in steps or step == cfg.iters) else None
        if lv is not None:
            if not math.isfinite(lv):
                raise _nonfinite("diffusion", step, cfg.lr)
            # Exact full-batch GD with a small enough step never raises the loss; a rise means
            # the step is past the stability edge (the run oscillates), so its numbers are suspect.
            if cfg.n_eps == 0 and history and lv > history[-1]["loss"] + 1e-12 * abs(lv):
                increases += 1
            history.append({"iter": step, "loss": lv, **nets.feature_metrics(W, x)})
        if progress and progress_every and step % progress_every == 0:
            _report(progress, "diffusion", step, cfg.iters, loss, nets.feature_metrics(W, x))
        if step < cfg.iters:
            W = W - cfg.lr * grad
    return _result(cfg, history, t0, W, loss_increases=increases)


def train_classifier(
    data: TwoPatchData,
    test: TwoPatchData | None,
    cfg: ClassifierConfig,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    progress_every: int = 0,
) -> dict:
    """GD on the logistic loss; records train (and test) accuracy with the feature metrics."""
    cfg.check()
    x, y = data.x, data.y
    W = nets.init_weights((2, cfg.m, data.d), cfg.sigma0, generator, x.dtype).to(x.device)
    steps = record_steps(cfg.iters, cfg.n_records)
    history: list[dict] = []
    t0 = time.perf_counter()
    for step in range(cfg.iters + 1):
        loss, grad = nets.classifier_loss_and_grad(W, x, y)
        if step in steps or step == cfg.iters:
            lv = loss.item()
            if not math.isfinite(lv):
                raise _nonfinite("classifier", step, cfg.lr)
            rec = {"iter": step, "loss": lv, **nets.feature_metrics(W, x, y)}
            rec["train_acc"] = nets.accuracy(W, x, y)
            if test is not None:
                rec["test_acc"] = nets.accuracy(W, test.x, test.y)
            history.append(rec)
        if progress and progress_every and step % progress_every == 0:
            _report(progress, "classifier", step, cfg.iters, loss, nets.feature_metrics(W, x, y))
        if step < cfg.iters:
            W = W - cfg.lr * grad
    return _result(cfg, history, t0, W)
