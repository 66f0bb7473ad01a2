"""Preemption: stop at a step boundary on a signal or a time limit, checkpoint, exit with PREEMPTED.

Clusters warn before they kill: SLURM sends SIGTERM (or, with `--signal=USR1@T`, SIGUSR1 T seconds
ahead), Kubernetes SIGTERM, a user at a terminal Ctrl-C. The handlers here only set a flag; the loop
reads it after each optimizer step, so the step in flight always finishes. In a multi-rank run the
ranks agree on the flag with one all-reduce (MAX) per step, so they stop at the same step and write
the checkpoint together, even when the signal reached only some of them. A second Ctrl-C raises
KeyboardInterrupt at once (exit 130, nothing written).

`engine.stop_after` serves schedulers that send nothing: the run stops at the last step it expects
to finish before the limit (counted from the start of the run in this process).
"""

from __future__ import annotations

import signal
import threading
import time

from ..errors import Preempted

# A code a requeue script can test: "preempted, checkpoint written, resume me". Never 0 (which
# reads as "finished"), and distinct from every error code (README, "Exit codes").
PREEMPTED_EXIT = Preempted.exit_code

# Reasons, as bits: the ranks OR them (an all-reduce MAX per bit). BUDGET is the loop's
# engine.time_budget_s, which ends the run (exit 0) rather than pausing it.
SIGNAL, TIME_LIMIT, BUDGET = 1, 2, 4
_BITS = (SIGNAL, TIME_LIMIT, BUDGET)


class StopWatch:
    """The stop requests of this process: signal handlers and the time limit.

    Use as a context manager around the step loop: the handlers are installed on entry (main thread
    only; elsewhere signals keep their previous handling) and the previous ones restored on exit.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, stop_after_s: float = 0.0, start: float | None = None):
        self.stop_after_s = stop_after_s
        self.start = time.time() if start is None else start
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._steps = 0
        self._t_first: float | None = None

    # Signals ----------------------------------------------------------------------------------
    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal_name is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, write nothing
        if self.signal_name is None:
            self.signal_name = name

    def __enter__(self) -> StopWatch:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    # Polled by the loop after each step ---------------------------------------------------------
    def step_done(self) -> None:
        """Called after each optimizer step: its timing predicts whether the next one fits."""
        now = time.time()
        if self._t_first is None:
            self._t_first = now  # the first step carries compile and warm-up: not a typical step
        else:
            self._steps += 1
        self._now = now

    def local_bits(self) -> int:
        bits = SIGNAL if self.signal_name is not None else 0
        if self.stop_after_s > 0:
            now = getattr(self, "_now", time.time())
            per_step = (now - self._t_first) / self._steps if self._steps and self._t_first else 0.0
            if now + per_step >= self.start + self.stop_after_s:
                bits |= TIME_LIMIT
        return bits

    def reason(self, bits: int) -> str:
        out = []
        if bits & SIGNAL:
            out.append(f"{self.signal_name} received" if self.signal_name else "another rank received a stop signal")
        if bits & TIME_LIMIT:
            out.append(f"engine.stop_after={self.stop_after_s:g}s reached")
        return " and ".join(out)


MARKER = "preempted.json"


def write_marker(out_dir, step: int, reason: str) -> None:
    """out_dir/preempted.json: the run stopped early and waits for `--engine.resume=auto`. Exit code
    10 says the same, but torchrun exits 1 when any rank exits non-zero; a requeue script under
    torchrun tests this file instead. Removed when the run starts again."""
    import json
    from pathlib import Path

    (Path(out_dir) / MARKER).write_text(json.dumps({"step": step, "reason": reason, "time": time.time()}) + "\n")


def clear_marker(out_dir) -> None:
    from pathlib import Path

    (Path(out_dir) / MARKER).unlink(missing_ok=True)


class Agreement:
    """One all-reduce (MAX) of the stop bits per step, on the CPU: with NCCL the default group
    would need a device tensor and a host read-back each step, so a gloo group carries it."""

    def __init__(self, world_size: int):
        self.group = None
        self.world_size = world_size
        if world_size > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def __call__(self, bits: int) -> int:
        if self.world_size <= 1:
            return bits
        import torch
        import torch.distributed as dist

        t = torch.tensor([bits & b for b in _BITS], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return sum(int(v) for v in t.tolist())


__all__ = ["MARKER", "PREEMPTED_EXIT", "Agreement", "Preempted", "StopWatch", "clear_marker", "write_marker"]
