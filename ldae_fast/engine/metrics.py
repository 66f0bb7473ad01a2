"""Metrics: JSONL always, progress on the console, TensorBoard when it is installed.

The training loop accumulates losses on the device and calls `log` every N steps, which is the
only point where it waits for the device: no host sync per step. `tick` is called every step and
only reads the host clock, so the progress can move by time rather than by log interval.

Console: on a terminal one bar, redrawn about once a second (step, images/s, elapsed, ETA and the
last logged metrics); elsewhere (a log file, CI) plain lines, one per log step, each with the
elapsed time and the ETA, and no carriage returns.

metrics.jsonl is appended to across runs of one directory; when a run starts at step S (a resume
from a step-S checkpoint, or S = 0 for a fresh run) the records of steps after S, left by the run
that went further before it stopped, are dropped first, so every step appears once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fmt_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m: short enough for a bar, exact enough for a log."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite the JSONL at `path` without records whose step is > `step`; -> how many went.

    A line that does not parse (a run killed mid-write) is dropped as well: it belongs to no step."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            dropped += 1
            continue
        if isinstance(rec_step, int) and rec_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class MetricLogger:
    REFRESH_S = 1.0  # terminal bar redraw interval

    def __init__(self, out_dir: str | Path, total_steps: int, enabled: bool = True, progress: bool = True,
                 stream: TextIO | None = None, clock=time.monotonic):
        self.enabled = enabled
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.tty = progress and enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.clock = clock
        self.t0 = clock()
        self._path = Path(out_dir) / "metrics.jsonl"
        self._jsonl = None
        self._tb = None
        # Set by the first tick/log: the step this run started from, when its first step ended, and
        # the images of the steps after that one.
        self._start_step: int | None = None
        self._t_start = self.t0
        self._step = 0
        self._images = 0
        self._last_draw = -float("inf")
        self._last_line = ""
        self._bar_open = False
        if enabled:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            try:  # optional: TensorBoard when installed, silently JSONL-only otherwise
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self._path.parent / "tb"))
            except Exception:
                self._tb = None

    def _begin(self, step: int) -> None:
        """`step` is this run's first: `step` - 1 were done before it (0 unless resumed)."""
        self._start_step = step - 1
        self._t_start = self.clock()
        self._step = step - 1
        if self.enabled:
            drop_records_after(self._path, self._start_step)
            self._jsonl = open(self._path, "a", buffering=1)

    def _eta(self, step: int) -> float | None:
        # Rates run from the end of the run's first step: that one also pays for warm-up
        # (compilation, allocator, first shards) and would bias the estimate.
        done = step - (self._start_step or 0) - 1
        if done <= 0:
            return None
        return (self.clock() - self._t_start) / done * max(0, self.total - step)

    def tick(self, step: int, images: int) -> None:
        """Step `step` (1-based) was queued with `images` images (all ranks). Host-side only."""
        if self._start_step is None:
            self._begin(step)
        else:
            self._images += images
        self._step = step
        if self.tty and (self.clock() - self._last_draw >= self.REFRESH_S or step >= self.total):
            self._draw()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._start_step is None:
            self._begin(step)
        if not self.enabled:
            return
        now = self.clock()
        rec = {"step": step, "time": round(now - self.t0, 3), **metrics}
        self._jsonl.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        self._last_line = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        self._step = max(self._step, step)
        if self.tty:
            self._draw()
        else:
            eta = self._eta(step)
            print(f"step {step}/{self.total} {self._last_line} | elapsed {fmt_duration(now - self.t0)} "
                  f"eta {'?' if eta is None else fmt_duration(eta)}", file=self.stream, flush=True)

    def _draw(self) -> None:
        step, width = self._step, 24
        now = self.clock()
        self._last_draw = now
        frac = min(1.0, step / max(1, self.total))
        filled = int(frac * width)
        elapsed = now - self._t_start
        rate = self._images / elapsed if elapsed > 0 and self._images else 0.0
        eta = self._eta(step)
        bar = "#" * filled + "-" * (width - filled)
        print(f"\r[{bar}] {step}/{self.total} {rate:.0f} img/s {fmt_duration(now - self.t0)} "
              f"eta {'?' if eta is None else fmt_duration(eta)} {self._last_line}\x1b[K",
              end="", file=self.stream, flush=True)
        self._bar_open = True
        if step >= self.total:
            print(file=self.stream, flush=True)
            self._bar_open = False

    def info(self, msg: str) -> None:
        if self.enabled:
            if self._bar_open:  # end the bar's line; the next draw starts a fresh one
                print(file=self.stream)
                self._bar_open = False
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar_open:
            print(file=self.stream, flush=True)
            self._bar_open = False
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
