"""What a resumable streaming eval run (probe_stream, finetune_stream) does after each optimizer
step: refuse a non-finite loss, checkpoint every `ckpt_every` steps and at the last, print the
progress line, call `on_step`, and say when to leave the step loop (the last step, or `stop_after`
steps of this call)."""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

from ..errors import NonFiniteLoss
from .features import Log

# Rank 0 prints at most one progress line per this many seconds (and always the last step's).
LOG_EVERY_S = 10.0


class StepTail:
    """One per run, made just before its step loop. `save(step, positions)` writes the checkpoint
    and is a collective (every rank calls it, or none: pass None when the run keeps none)."""

    def __init__(self, *, desc: str, what: str, hint: str, total: int, steps_per_epoch: int,
                 global_batch: int, step0: int, main: bool, save: Optional[Callable[[int, dict], None]],
                 ckpt_every: int, log: Log, on_step: Optional[Callable[[int], None]], stop_after: int,
                 t_start: float) -> None:
        self.desc, self.what, self.hint = desc, what, hint
        self.total, self.spe, self.G, self.step0 = total, steps_per_epoch, global_batch, step0
        self.main, self.save, self.every = main, save, max(1, ckpt_every)
        self.log, self.on_step, self.stop_after, self.t_start = log, on_step, stop_after, t_start
        self.t0 = self.last = time.perf_counter()
        # The result of a run left after `stop_after` steps (no validation); None otherwise.
        self.stopped: Optional[dict] = None

    def end(self, step: int, pos: dict, loss: float, lr: float) -> bool:
        """After step `step` (0-based) with the global mean `loss` at learning rate `lr`, the data
        positions `pos` of this rank's readers; True: leave the step loop."""
        done = step + 1
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"{self.desc}: the {self.what}'s loss is {loss} at step {done}; {self.hint}")
        if self.save is not None and (done % self.every == 0 or done == self.total):
            self.save(done, pos)
        now = time.perf_counter()
        if self.log is not None and self.main and (now - self.last > LOG_EVERY_S or done == self.total):
            rate = (done - self.step0) * self.G / max(now - self.t0, 1e-9)
            eta = (self.total - done) * self.G / max(rate, 1e-9)
            self.log(f"{self.desc}: step {done}/{self.total} (epoch {done / self.spe:.2f}) loss {loss:.4f} "
                     f"lr {lr:.3g}, {rate:.0f} img/s, ETA {eta / 60:.1f} min")
            self.last = now
        if self.on_step is not None:
            self.on_step(done)
        if done >= self.total:
            return True
        if self.stop_after and done - self.step0 >= self.stop_after:
            if self.save is not None and done % self.every:
                self.save(done, pos)
            self.stopped = dict(stopped_at=done, steps=self.total, resumed_from=self.step0,
                                seconds=time.perf_counter() - self.t_start)
            return True
        return False


__all__ = ["StepTail"]
