"""Profiling helpers: a step-scheduled torch.profiler wrapper (and `nvtx_range`, re-exported).

`nvtx_range` (defined in ldae_fast/markers.py) marks phases of a training step (noise / encoder /
decoder / loss / backward / optimizer) for Nsight Systems. While a `StepProfiler` is collecting
it also opens a `torch.profiler.record_function` range, so the same phases show up in the Chrome
trace, on CPU too. Outside a profile and without CUDA it does nothing: the training loop can keep
the ranges in unconditionally.

`StepProfiler` runs torch.profiler for `wait + warmup + steps` calls of `.step()` (one per
optimizer step), writes a Chrome trace (the same file also in TensorBoard's layout) and a table of
the kernels (GPU) or ops (CPU) that took the most time, as a share of the profiled steps.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import markers
from ..markers import nvtx_range

__all__ = ["StepProfiler", "TOP_KERNELS_FILE", "nvtx_range", "profile_calls", "top_kernels_table"]

TOP_KERNELS_FILE = "profile_top_kernels.md"


# The scope of record_function ranges on the host.
_USER_SCOPE = int(getattr(getattr(torch._C._profiler, "RecordScope", None), "USER_SCOPE", 7))


def _on_device(evt: Any) -> bool:
    """Whether an averaged event lives on the device timeline (a kernel, a memcpy, or a range's
    projection onto the GPU) rather than the host's."""
    dt = getattr(evt, "device_type", None)
    return dt is not None and str(dt).rsplit(".", 1)[-1] != "CPU"


def _device_time_us(evt: Any) -> float:
    # Renamed from *cuda* to *device* in torch 2.4; accept both.
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def _is_step_marker(key: str) -> bool:
    # One range per scheduled step; key_averages() groups them as "ProfilerStep*".
    return key.startswith("ProfilerStep")


def top_kernels_table(prof: Any, n: int = 15) -> str:
    """Markdown table of the n kernels (on a GPU) or ops (on CPU) with the most self time, and
    their share of the profiled steps.

    On a GPU the rows are the device-side events only: kernels and copies. The host ops that
    launched them (whose "self device time" is the same kernels again) are left out, and so are
    the projections of ranges (ProfilerStep#, our phase ranges, Optimizer.step ...) onto the GPU
    timeline, which span many kernels: torch flags them `is_user_annotation`, and before it did
    they share their name with a user-scope host range. The share is relative to the GPU span of the
    profiled steps, so rows plus idle gaps make up 100%. On CPU the rows are host ops by self time
    against the wall time of the steps. Without step markers (step() never called) shares are
    of the summed time.
    """
    events = list(prof.key_averages())
    # Host ranges opened by record_function (user scope); inductor's per-kernel host ranges,
    # named like their kernels, are function scope and do not match.
    ranges = {e.key for e in events if not _on_device(e) and getattr(e, "scope", None) == _USER_SCOPE}
    device = [e for e in events if _on_device(e)]
    on_device = any(_device_time_us(e) > 0 for e in device)
    if on_device:
        def is_range(e: Any) -> bool:
            return (bool(getattr(e, "is_user_annotation", False)) or e.key in ranges
                    or _is_step_marker(e.key))

        rows = [(e, _device_time_us(e)) for e in device if not is_range(e)]
        step_events = [e for e in device if _is_step_marker(e.key)]
        step_time = sum(float(getattr(e, "device_time_total", 0.0) or _device_time_us(e))
                        for e in step_events)
        span = "GPU span of the profiled steps"
    else:
        rows = [(e, float(getattr(e, "self_cpu_time_total", 0.0))) for e in events
                if not _is_step_marker(e.key)]
        step_events = [e for e in events if _is_step_marker(e.key)]
        step_time = sum(float(getattr(e, "cpu_time_total", 0.0)) for e in step_events)
        span = "wall time of the profiled steps"
    steps = sum(int(getattr(e, "count", 1)) for e in events
                if _is_step_marker(e.key) and not _on_device(e))
    rows = [r for r in rows if r[1] > 0]
    rows.sort(key=lambda r: r[1], reverse=True)
    total = sum(t for _, t in rows)
    denom = step_time if step_time > 0 else total
    basis = span if step_time > 0 else "summed self time"
    what = "kernels by device (GPU) self time" if on_device else "ops by CPU self time"
    lines = [
        f"Top {min(n, len(rows))} {what}; share of the {basis}"
        + (f" ({steps} step(s), {denom / 1e3:.2f} ms)" if step_time > 0 else f" ({denom / 1e3:.2f} ms)"),
        "",
        "| # | op / kernel | calls | total ms | avg us | share |",
        "|--:|:--|--:|--:|--:|--:|",
    ]
    listed = 0.0
    for i, (e, t) in enumerate(rows[:n], 1):
        calls = int(getattr(e, "count", 1)) or 1
        name = e.key.replace("|", "\\|")
        if len(name) > 90:
            name = name[:87] + "..."
        share = 100.0 * t / denom if denom > 0 else 0.0
        listed += t
        lines.append(f"| {i} | `{name}` | {calls} | {t / 1e3:.3f} | {t / calls:.1f} | {share:.1f}% |")
    if not rows:
        lines.append("| - | (no timed ops recorded) | 0 | 0 | 0 | 0% |")
    elif denom > 0:
        lines += ["", f"Listed rows cover {100.0 * listed / denom:.1f}% of the {basis}; "
                      f"all recorded {'kernels' if on_device else 'ops'} {100.0 * total / denom:.1f}%."]
    return "\n".join(lines) + "\n"


def fit_window(wait: int, warmup: int, steps: int, available: int) -> tuple[int, int, int]:
    """Shrink a profile window (wait, warmup, steps) to `available` steps: the skipped steps go
    first, then the warm-up, then recorded steps; steps = 0 when nothing fits."""
    available = max(int(available), 0)
    wait = max(0, min(wait, available - warmup - steps))
    warmup = max(0, min(warmup, available - wait - steps))
    steps = max(0, min(steps, available - wait - warmup))
    return wait, warmup, steps


class StepProfiler:
    """torch.profiler over a window of training steps; call `.step()` once per optimizer step.

    Skips `wait` steps, warms up for `warmup` (collects, discards), records `steps`, then writes
    into out_dir: trace_step<N>.json (Chrome / Perfetto), the same file under tb/ in the layout
    of TensorBoard's profiler plugin (`tensorboard --logdir OUT/tb`; a hard link, no second
    export), and profile_top_kernels.md, and prints the table. `steps <= 0` makes it inert, so
    a loop can always build one from its config. A window closed before any step was recorded
    writes nothing.
    """

    def __init__(self, out_dir: str | Path, steps: int, wait: int = 1, warmup: int = 1,
                 top_n: int = 15, record_shapes: bool = False, verbose: bool = True) -> None:
        if wait < 0 or warmup < 0:
            raise ValueError(f"wait={wait} and warmup={warmup} must be >= 0")
        self.out_dir = Path(out_dir)
        self.steps = int(steps)
        self.wait, self.warmup, self.top_n, self.verbose = wait, warmup, top_n, verbose
        self.table: str | None = None
        self.trace_path: Path | None = None
        self.table_path: Path | None = None
        self._calls = 0
        self._prof: Any = None
        self._done = self.steps <= 0
        self._counted = False
        self._discard = False
        if self._done:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if markers._cuda_present():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with warnings.catch_warnings():
            # torch warns when warmup is 0; from_config has said why and what it costs.
            warnings.filterwarnings("ignore", message=".*warmup.*", category=UserWarning)
            schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=self.steps, repeat=1)
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=schedule,
            on_trace_ready=self._on_trace_ready,
            record_shapes=record_shapes,
        )
        self._prof.start()
        self._enter_count()

    @classmethod
    def from_config(cls, profile_cfg: Any, default_out_dir: str | Path, available: int | None = None,
                    log: Callable[[str], Any] = print, **kwargs: Any) -> StepProfiler:
        """From a section with `.steps` and `.out_dir` (ProfileConfig); '' out_dir -> default_out_dir.

        `available`: steps the run has left; the window is shrunk to fit them (first the skipped
        step, then the warm-up, then the recorded steps), saying so through `log`.
        """
        out = getattr(profile_cfg, "out_dir", "") or default_out_dir
        steps = int(getattr(profile_cfg, "steps", 0))
        wait, warmup = int(kwargs.pop("wait", 1)), int(kwargs.pop("warmup", 1))
        if steps > 0 and available is not None and wait + warmup + steps > available:
            want = (wait, warmup, steps)
            wait, warmup, steps = fit_window(wait, warmup, steps, available)
            if steps < 1:
                log(f"profiler: the run has {available} step(s) left; nothing to profile")
            else:
                log(f"profiler: the run has {available} step(s) left, so the window of "
                    f"{want[0]} skipped + {want[1]} warm-up + {want[2]} recorded step(s) becomes "
                    f"{wait} + {warmup} + {steps}"
                    + ("; with no warm-up the first recorded step includes start-up costs"
                       " (compilation, allocator growth)" if warmup == 0 else ""))
        return cls(out, steps, wait=wait, warmup=warmup, **kwargs)

    def _enter_count(self) -> None:
        if not self._counted:
            markers.profiling_started()
            self._counted = True

    def _leave_count(self) -> None:
        if self._counted:
            markers.profiling_stopped()
            self._counted = False

    @property
    def active(self) -> bool:
        """True until the scheduled window has been recorded and written (or close() was called)."""
        return not self._done

    @property
    def recorded(self) -> int:
        """Steps finished inside the recorded part of the window (callers close after step())."""
        return max(0, min(self.steps, self._calls - self.wait - self.warmup))

    @property
    def total_steps(self) -> int:
        """Calls of step() the window spans: wait + warmup + steps."""
        return self.wait + self.warmup + max(self.steps, 0)

    def step(self) -> None:
        """Mark the end of one training step; finishes the profile after the window."""
        if self._done:
            return
        # Counted before torch's step(): at the window's last step it writes the trace (and the
        # header's `recorded`) from inside it.
        self._calls += 1
        self._prof.step()
        if self._calls >= self.total_steps:
            self.close()

    def _on_trace_ready(self, prof: Any) -> None:
        if self._discard:
            return
        try:
            self._write(prof)
        except Exception as e:  # a profile is a by-product: it must not end the training run
            print(f"profiler: could not write the profile into {self.out_dir} "
                  f"({type(e).__name__}: {e}); training goes on")

    def _write(self, prof: Any) -> None:
        # One export, in TensorBoard's layout (<worker>.<id>.pt.trace.json under a run folder,
        # as torch.profiler.tensorboard_trace_handler names it), linked to a plain name.
        tb_dir = self.out_dir / "tb"
        tb_dir.mkdir(parents=True, exist_ok=True)
        tb_path = tb_dir / f"{socket.gethostname()}_{os.getpid()}.{time.time_ns()}.pt.trace.json"
        prof.export_chrome_trace(str(tb_path))
        self.trace_path = self.out_dir / f"trace_step{prof.step_num}.json"
        self.trace_path.unlink(missing_ok=True)
        try:
            os.link(tb_path, self.trace_path)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(tb_path, self.trace_path)
        self.table = top_kernels_table(prof, self.top_n)
        self.table_path = self.out_dir / TOP_KERNELS_FILE
        header = (f"# Profile: top ops\n\nsteps recorded: {self.recorded} (after {self.wait} skipped, "
                  f"{self.warmup} warm-up); written {time.strftime('%Y-%m-%d %H:%M:%S')}; "
                  f"trace: {self.trace_path.name}\n\n")
        self.table_path.write_text(header + self.table)
        if self.verbose:
            print(self.table, end="")
            print(f"profiler: trace {self.trace_path}, table {self.table_path}")

    def close(self) -> None:
        """Stop early or after the window; safe to call twice. A window cut short writes nothing
        when no step was recorded yet."""
        if self._done:
            self._leave_count()
            return
        self._done = True
        self._discard = self.recorded < 1
        try:
            self._prof.stop()
        finally:
            self._leave_count()

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def profile_calls(fn: Callable[[], Any], out_dir: str | Path, calls: int = 3, wait: int = 0, warmup: int = 1,
                  verbose: bool = True) -> StepProfiler:
    """Profile `calls` calls of fn (after `wait` untraced and `warmup` discarded ones), one
    profiler step per call: the benchmarks' --profile. Returns the closed StepProfiler, whose
    trace_path / table_path say what was written into out_dir."""
    if calls < 1:
        raise ValueError(f"calls={calls} must be >= 1")
    prof = StepProfiler(out_dir, steps=calls, wait=wait, warmup=warmup, verbose=verbose)
    try:
        for _ in range(prof.total_steps):
            fn()
            prof.step()
    finally:
        prof.close()
    return prof
