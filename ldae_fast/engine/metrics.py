"""Metrics: JSONL always, a progress bar on a terminal, TensorBoard when it is installed.

The training loop accumulates losses on the device and calls `log` every N steps, which is the
only point where it waits for the device: no host sync per step.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class MetricLogger:
    def __init__(self, out_dir: str | Path, total_steps: int, enabled: bool = True, progress: bool = True,
                 stream: TextIO | None = None):
        self.enabled = enabled
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.tty = progress and enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.time()
        self._jsonl = None
        self._tb = None
        if enabled:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)
            try:  # optional: TensorBoard when installed, silently JSONL-only otherwise
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(out / "tb"))
            except Exception:
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
        self._jsonl.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        line = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        if self.tty:
            self._bar(step, line)
        else:
            print(f"step {step}/{self.total} {line}", file=self.stream, flush=True)

    def _bar(self, step: int, line: str) -> None:
        width = 24
        frac = min(1.0, step / max(1, self.total))
        filled = int(frac * width)
        elapsed = time.time() - self.t0
        eta = elapsed / max(frac, 1e-9) - elapsed if frac > 0 else 0.0
        bar = "#" * filled + "-" * (width - filled)
        print(f"\r[{bar}] {step}/{self.total} eta {eta:5.0f}s {line}\x1b[K", end="", file=self.stream, flush=True)
        if step >= self.total:
            print(file=self.stream)

    def info(self, msg: str) -> None:
        if self.enabled:
            if self.tty:
                print(file=self.stream)
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
