"""The training loop: thin, model-agnostic, resumable.

Everything specific to a method (l-DAE, its tokenizer, its noise) lives behind the methods
registry; everything specific to a device strategy lives in the backend (single_device.py,
ddp_backend.py, deepspeed_backend.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..batch import Batch
from ..config import CUDA_GRAPH_MODES, Config, ConfigError, parse_duration
from ..device import autocast_dtype, resolve_device
from ..errors import CheckpointError, ResumeMismatch
from ..lr_schedule import lr_at_step
from ..methods import Method, build_method
from ..models.compile import compile_blocks, mark_step_begin
from ..tokenizers import fit_config
from ..tokenizers._io import TokenizerFileError
from . import checkpoint as ckpt_mod
from . import guard, preempt, reshape, rundir
from .guard import NonFiniteLoss
from .metrics import MetricLogger
from .mfu import peak_tflops_for, train_flops
from .optim import EMA
from .profiling import StepProfiler, nvtx_range
from .single_device import SingleDevice


def start_step_of(state: dict) -> int:
    return int(state.get("step", 0))


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    images_per_s: float = 0.0
    model: torch.nn.Module | None = None
    ema: EMA | None = None
    method: Method | None = None
    is_main: bool = True

    @property
    def tokenizer(self):
        return getattr(self.method, "tokenizer", None)


def bind_local_rank(device: torch.device) -> None:
    """Make cuda:LOCAL_RANK the current device of a launched rank, before anything touches CUDA:
    otherwise every rank builds its model on GPU 0 first and leaves a context and a freed copy
    of the model reserved there."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        rank, n = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if not 0 <= rank < n:
            raise RuntimeError(f"LOCAL_RANK={rank} but this process sees {n} GPU(s) "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        torch.cuda.set_device(rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_resume_fits(state: dict, ckpt_dir: Path, cfg: Config, world: int) -> reshape.ResumePlan:
    """Refuse a resume that cannot continue the run (another model; another global batch without
    engine.resume_rebatch; ZeRO state on another rank count), else say how it continues: another
    rank count, micro-batch or accumulation of the same global batch continues exactly (reshape.py)."""
    return reshape.plan_resume(state, ckpt_dir, cfg, world)


class _CheckpointClock:
    """engine.ckpt_every_s: whether that many seconds passed since the last checkpoint (or the
    start). One process looks every step; several ranks agree at log steps, on rank 0's clock."""

    def __init__(self, every_s: float, world: int, reduce_max, device) -> None:
        self.every_s, self.world, self.reduce_max, self.device = every_s, world, reduce_max, device
        self.last = time.time()

    def due(self, step: int, log_every: int) -> bool:
        if not self.every_s:
            return False
        if self.world == 1 or self.reduce_max is None:
            return time.time() - self.last >= self.every_s
        if step % log_every:
            return False
        flag = torch.tensor(int(time.time() - self.last >= self.every_s) if self._rank0() else 0,
                            device=self.device)
        return bool(self.reduce_max(flag).item())

    @staticmethod
    def _rank0() -> bool:
        return int(os.environ.get("RANK", "0")) == 0

    def saved(self) -> None:
        self.last = time.time()


def train(cfg: Config, backend_factory=None, log_enabled: bool | None = None) -> TrainResult:
    """Run (or resume) the pretraining described by cfg; returns the final state and losses.

    The run owns engine.out_dir while it runs (see rundir.py). SIGTERM, SIGUSR1, a first Ctrl-C or
    engine.stop_after end it at a step boundary with a checkpoint and raise preempt.Preempted
    (see preempt.py)."""
    with rundir.owned(cfg.engine.out_dir, cfg.engine.resume, cfg.engine.overwrite,
                      is_main=int(os.environ.get("RANK", "0")) == 0), \
            preempt.StopWatch(parse_duration(cfg.engine.stop_after)) as watch:
        return _train(cfg, backend_factory, log_enabled, watch)


def _train(cfg: Config, backend_factory=None, log_enabled: bool | None = None,
           watch: preempt.StopWatch | None = None) -> TrainResult:
    from ..data import build_train_stream
    from ..methods import build_model

    device = resolve_device(cfg.engine.device, "engine.device", ConfigError)
    bind_local_rank(device)
    out_dir = Path(cfg.engine.out_dir)
    seed_everything(cfg.engine.seed)
    if cfg.engine.deterministic:
        # Read when cuBLAS makes its handle, i.e. at the first matmul of the process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        if device.type == "cuda":
            warnings.warn("engine.deterministic on CUDA: deterministic kernels (attention backward "
                          "among them) are slower, and an op without one raises; use it to debug, "
                          "not to train at scale", stacklevel=2)
    e = cfg.engine
    if e.backend == "deepspeed" and e.zero_stage == 3 and e.compile and cfg.model.grad_checkpointing:
        # Seen on CPU ranks: ZeRO-3's parameter gathering inside the checkpointed region is not
        # traceable, so Dynamo falls back to eager for every block (results are unchanged).
        warnings.warn("ZeRO-3 + engine.compile + model.grad_checkpointing: the blocks run eager "
                      "(ZeRO-3's parameter hooks inside the checkpoint stop torch.compile); drop "
                      "one of the three to compile them", stacklevel=2)

    resume_dir = ckpt_mod.resolve_resume(cfg.engine.resume, out_dir)
    resume_state = ckpt_mod.load_state(resume_dir) if resume_dir else None

    model = build_model(cfg, kernels=cfg.engine.kernels).to(device)
    graphs = cfg.engine.compile and cfg.engine.compile_mode in CUDA_GRAPH_MODES
    if cfg.engine.compile:
        compile_blocks(model, mode=cfg.engine.compile_mode)
    backend = (backend_factory or SingleDevice)(cfg, model, 0.0)
    world, rank, is_main = backend.world_size, backend.rank, backend.is_main
    watch = watch or preempt.StopWatch()
    agree = preempt.Agreement(world)  # collective: every rank builds it here
    plan = None
    if resume_state is not None:  # before anything is written into the run directory
        plan = check_resume_fits(resume_state, resume_dir, cfg, world)
    lr0 = cfg.lr(world)
    total = cfg.total_steps(world)
    warmup = int(round(cfg.optim.warmup_epochs * cfg.steps_per_epoch(world)))
    if warmup >= total:
        warnings.warn(f"optim.warmup_epochs={cfg.optim.warmup_epochs:g} is {warmup} warm-up steps, not fewer "
                      f"than the run's {total}: the learning rate never reaches its peak {lr0:.3g}; "
                      "shorten the warm-up or lengthen the run", stacklevel=2)
    logger = MetricLogger(out_dir, total, enabled=is_main if log_enabled is None else log_enabled,
                          progress=cfg.engine.progress)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.json")
        preempt.clear_marker(out_dir)

    method = build_method(cfg, device, rank=rank, world_size=world)

    def fit_images():
        return (imgs for imgs, _ in build_train_stream(fit_config(cfg), rank=0, world_size=1))

    try:
        method.prepare(fit_images, rank=rank, log=logger.info,
                       broadcast=(lambda obj: backend.all_gather_object(obj)[0]) if world > 1 else None,
                       state=ckpt_mod.method_state(resume_state) if resume_state is not None else None)
    except TokenizerFileError as err:  # from the checkpoint's method state (tokenizer.path names itself)
        if resume_state is None:
            raise
        raise CheckpointError(f"{resume_dir}: its tokenizer is damaged ({err})") from None
    if is_main and resume_state is None:
        method.export(out_dir)
    amp = autocast_dtype(cfg.engine.precision, device)
    # Under ZeRO-3 each rank holds a partition of every parameter: so does its EMA (zero3_ema.py).
    zero3 = cfg.engine.backend == "deepspeed" and cfg.engine.zero_stage == 3
    ema = None
    if cfg.optim.ema_decay > 0:
        if zero3:
            from .zero3_ema import ShardedEMA
            ema = ShardedEMA(model, cfg.optim.ema_decay)
        else:
            ema = EMA(model, cfg.optim.ema_decay)
    # With a CUDA device the stream ships uint8 and normalises there: a quarter of the transfer.
    stream = build_train_stream(cfg, rank=rank, world_size=world, device=device if device.type == "cuda" else None)

    start = 0
    if resume_state is not None:
        try:
            backend.load_state_dict(resume_state, resume_dir)
            if ema is not None and resume_state.get("ema"):
                ema.load_state_dict(resume_state["ema"], resume_state.get("ema_updates", start_step_of(resume_state)))
        except RuntimeError as err:  # a network change the config comparison above did not name
            params = guard.state_dict_mismatch(err)
            if params is None:
                raise
            raise ResumeMismatch(f"{resume_dir} holds another network ({params} differ in shape or are "
                                 "missing): a resume keeps the network; start a new run (a new out_dir) "
                                 "to train another one") from None
        stream.load_state_dict(plan.data_state(resume_state, rank))
        ckpt_mod.set_rng_state(resume_state["rng"])
        start = plan.step
        if plan.note:
            logger.info(plan.note)
        logger.info(f"resumed from {resume_dir} at step {start}")
    if start >= total:
        logger.info(f"nothing to do: the run is already at step {start} of {total}")

    _, flops_img = train_flops(cfg)
    peak = cfg.engine.peak_tflops or (peak_tflops_for(torch.cuda.get_device_name(device))[0]
                                      if device.type == "cuda" else None)
    # ZeRO-3 leaves each rank an empty placeholder per parameter; ds_numel is the full size.
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    logger.info(f"model {cfg.model.size} ({n_params / 1e6:.2f}M params) on {device}, kernels={method.kernels}, "
                f"precision={'bf16' if amp else 'fp32'}, world={world}, global batch={cfg.global_batch(world)}, "
                f"lr={lr0:.3g}, steps={total} (warm-up {warmup})")

    def save(step: int) -> Path:
        # The one host sync of a checkpoint: a non-finite state is never written.
        try:
            guard.check_before_save(step, first_bad, model, ema, ckpt_mod.newest_good(out_dir),
                                    getattr(backend, "all_reduce_max", None) if world > 1 else None)
        except NonFiniteLoss:
            logger.close()
            prof.close()
            raise
        state = backend.state_dict()
        data = stream.state_dict()
        # Each rank reads its own shards: rank 0 writes state.pt, so it keeps every rank's position.
        data_ranks = backend.all_gather_object(data) if world > 1 else [data]
        # The open log window, so a resume continues the loss curve where it stopped.
        w_loss = backend.all_reduce_mean(win_loss) if world > 1 else win_loss
        window = {"loss": float(w_loss.item()), "grad_norm": float(win_norm.item()), "steps": win_steps}
        state.update(step=step, world_size=world,
                     ema=getattr(ema, "checkpoint_state", ema.state_dict)() if ema else None,
                     ema_updates=ema.updates if ema else 0,
                     data=data, data_ranks=data_ranks, log_window=window,
                     rng=ckpt_mod.rng_state(), config=cfg.to_dict(), method=method.state_dict())
        return ckpt_mod.write_checkpoint(out_dir, step, state, cfg.engine.keep_last,
                                         extra_meta={"preset": cfg.preset, "diverging": div_guard.run > 0},
                                         writer=backend.save_extra,
                                         is_main=is_main, barrier=getattr(backend, "barrier", None),
                                         any_failed=any_rank_failed if world > 1 and backend.save_on_all_ranks else None)

    def any_rank_failed(failed_here: bool) -> bool:
        # Every rank writes its part: all learn of a failure anywhere, so all retry or stop alike.
        return bool(backend.all_reduce_max(torch.tensor(int(failed_here), device=device)).item())

    write_failures = 0

    def save_or_retry(step: int) -> Path | None:
        """A periodic checkpoint: a failed write is a warning and the next interval tries again,
        until engine.ckpt_write_failures writes in a row have failed."""
        nonlocal write_failures
        err: ckpt_mod.CheckpointWriteError | None = None
        try:
            path = save(step)
        except ckpt_mod.CheckpointWriteError as e:
            path, err = None, e
        if err is not None:
            write_failures += 1
            if write_failures >= cfg.engine.ckpt_write_failures:
                logger.close()
                prof.close()
                raise ckpt_mod.CheckpointWriteError(
                    f"{err} ({write_failures} checkpoint writes in a row failed: stopping; "
                    "free space or raise the limit, then --engine.resume=auto)") from None
            warnings.warn(f"WARNING: {err}; training goes on and tries again at the next checkpoint "
                          f"({write_failures} of engine.ckpt_write_failures={cfg.engine.ckpt_write_failures} "
                          "failed writes in a row)", stacklevel=2)
            return None
        write_failures = 0
        return path

    ckpt_clock = _CheckpointClock(cfg.engine.ckpt_every_s, world,
                                  getattr(backend, "all_reduce_max", None), device)
    it = iter(stream)
    losses: list[tuple[int, float]] = []
    win_loss = torch.zeros((), device=device)
    win_norm = torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    win_steps, win_images, t_win = 0, 0, time.time()
    last_ckpt, final_loss, ips = None, float("nan"), 0.0
    div_guard = guard.DivergenceGuard(cfg.engine.diverge_grad_norm, cfg.engine.diverge_checks)
    prof = (StepProfiler.from_config(cfg.profile, out_dir / "profile", available=total - start,
                                     log=logger.info)
            if is_main else StepProfiler(out_dir, 0))
    if resume_state is not None and resume_state.get("log_window"):
        w = resume_state["log_window"]
        win_loss.fill_(float(w["loss"]))
        win_norm.fill_(float(w["grad_norm"]))
        win_steps = int(w["steps"])
    micro_step = getattr(backend, "micro_step", lambda last: contextlib.nullcontext())
    model.train()
    deadline = time.time() + cfg.engine.time_budget_s if cfg.engine.time_budget_s > 0 else None
    for step in range(start, total):
        lr = lr_at_step(step, lr0, warmup, total, cfg.optim.min_lr)
        step_loss = torch.zeros((), device=device)
        for micro in range(cfg.engine.grad_accum):
            if graphs:  # each micro-batch replays the graphs: the last one's outputs are spent
                mark_step_begin()
            batch = Batch.of(next(it)).to(device, non_blocking=True)
            # DDP all-reduces the gradients only in the last micro-batch's backward.
            with micro_step(micro == cfg.engine.grad_accum - 1):
                loss = method(backend.model, batch, step, micro, cfg.engine.grad_accum, autocast_dtype=amp)
                with nvtx_range("backward"):
                    backend.backward(loss)
            step_loss += loss.detach() / cfg.engine.grad_accum
            win_images += len(batch) * world
        with nvtx_range("optimizer"):
            norm = backend.step(lr)
            if ema is not None:
                ema.update(model)
        prof.step()
        # Recorded on the device: the host looks only at log time.
        bad_now = (~torch.isfinite(step_loss)) & (first_bad < 0)
        first_bad = torch.where(bad_now, torch.full_like(first_bad, step + 1), first_bad)
        win_loss += step_loss
        win_norm += norm.float()
        win_steps += 1
        done = step + 1
        watch.step_done()
        stop = watch.local_bits()
        if deadline is not None and time.time() >= deadline:
            stop |= preempt.BUDGET
        # The ranks agree, so they stop at the same step (a signal may reach only some of them).
        stop = agree(stop) if done < total else 0
        if stop & preempt.BUDGET:
            logger.info(f"engine.time_budget_s={cfg.engine.time_budget_s:g} spent: stopping at step {done} of {total}")
            total = done  # this step is the last: its log line and the final checkpoint follow
            stop = 0
        logger.tick(done, cfg.global_batch(world))
        if done % cfg.engine.log_every == 0 or done == total:
            if world > 1:  # every rank must stop at the same log step, or the others hang
                first_bad = backend.all_reduce_max(first_bad)
            bad = int(first_bad.item())
            if bad >= 0:
                logger.close()
                prof.close()
                raise NonFiniteLoss(
                    f"loss became non-finite at step {bad} (lr {lr_at_step(bad - 1, lr0, warmup, total, cfg.optim.min_lr):.3g}); "
                    f"stopping without saving. Newest good checkpoint: {ckpt_mod.newest_good(out_dir)}. "
                    "Try a lower --optim.blr, --optim.clip_grad, or --engine.precision=fp32.")
            dt = time.time() - t_win
            if world > 1:  # the loss of the global batch, comparable to a single-device run's
                win_loss = backend.all_reduce_mean(win_loss)
            final_loss = float(win_loss.item()) / win_steps
            ips = win_images / max(dt, 1e-9)
            tflops = ips / world * flops_img / 1e12  # per device, model FLOPs (see engine/mfu.py)
            losses.append((done, final_loss))
            rec = {"loss": final_loss, "lr": lr, "grad_norm": float(win_norm.item()) / win_steps,
                   "images_per_s": round(ips, 1), "tflops": float(f"{tflops:.4g}")}
            if peak:
                rec["mfu"] = round(tflops / peak, 4)
            rec["peak_mem_mb"] = round(peak_memory_mb(device), 1)
            logger.log(done, rec)
            try:
                div_guard.observe(done, rec["grad_norm"], lambda: ckpt_mod.newest_good(out_dir))
            except guard.Diverged:
                logger.close()
                prof.close()
                raise
            win_loss.zero_()
            win_norm.zero_()
            win_steps, win_images, t_win = 0, 0, time.time()
        wrote = None
        if done != total and (cfg.engine.ckpt_every and done % cfg.engine.ckpt_every == 0
                              or ckpt_clock.due(done, cfg.engine.log_every)):
            if is_main or backend.save_on_all_ranks:
                wrote = save_or_retry(done)
                last_ckpt = wrote or last_ckpt
            ckpt_clock.saved()
        if stop:
            if wrote is None and (is_main or backend.save_on_all_ranks):
                last_ckpt = save(done)  # a failed write here ends the run with its own error
            msg = (f"stopped at step {done} of {total} ({watch.reason(stop)}); checkpoint "
                   f"{last_ckpt or ckpt_mod.latest_checkpoint(out_dir)}; continue with --engine.resume=auto")
            logger.info(msg)
            if is_main:  # for launchers (torchrun) whose own exit status hides the ranks' code 10
                preempt.write_marker(out_dir, done, watch.reason(stop))
            logger.close()
            prof.close()
            raise preempt.Preempted(msg)
        if done == total:
            break
    prof.close()
    if total > start:  # the final checkpoint: a failed write stops the run (exit 4)
        if is_main or backend.save_on_all_ranks:
            try:
                last_ckpt = save(total)
            except ckpt_mod.CheckpointWriteError:
                logger.close()
                raise
        else:
            last_ckpt = None
        if last_ckpt is not None:
            logger.info(f"checkpoint: {last_ckpt}")
    logger.close()
    return TrainResult(out_dir, total, final_loss, losses, last_ckpt, ips, model, ema, method, is_main)
