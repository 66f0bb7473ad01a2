"""Profiling helpers: a step-scheduled torch.profiler wrapper (and `nvtx_range`, re-exported).

`nvtx_range` (defined in ldae_fast/markers.py) marks phases of a training step (noise / encoder /
decoder / loss / backward / optimizer) for Nsight Systems. While a `StepProfiler` is collecting
it also opens a `torch.profiler.record_function` range, so the same phases show up in the Chrome
trace, on CPU too. Outside a profile and without CUDA it does nothing: the training loop can keep
the ranges in unconditionally.

`StepProfiler` runs torch.profiler for `wait + warmup + steps` calls of `.step()` (one per
optimizer step), writes a Chrome trace (plus TensorBoard's layout when tensorboard is installed)
and a table of the ops/kernels that took the most device time, as a share of the profiled steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import markers
from ..markers import nvtx_range

__all__ = ["StepProfiler", "TOP_KERNELS_FILE", "nvtx_range", "profile_calls", "top_kernels_table"]

TOP_KERNELS_FILE = "profile_top_kernels.md"


def _tensorboard_importable() -> bool:
    try:
        import tensorboard  # noqa: F401
    except Exception:
        return False
    return True


def _event_time_us(evt: Any, on_device: bool) -> float:
    """Self time of one averaged event: on the device (GPU kernels) or on the CPU."""
    if on_device:
        # Renamed from *cuda* to *device* in torch 2.4; accept both.
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            v = getattr(evt, attr, None)
            if v is not None:
                return float(v)
        return 0.0
    return float(getattr(evt, "self_cpu_time_total", 0.0))


def _is_step_marker(key: str) -> bool:
    # One range per scheduled step; key_averages() groups them as "ProfilerStep*".
    return key.startswith("ProfilerStep")


def top_kernels_table(prof: Any, n: int = 15) -> str:
    """Markdown table of the n ops/kernels with the most self time, and their share of the steps.

    On a GPU the time is device (kernel) time; otherwise CPU self time. Self times are used so a
    parent op is not counted again with its children. The share is relative to the wall time of
    the profiled steps (the ProfilerStep# ranges), so the rows plus idle gaps make up 100%; when
    no step markers exist (the caller never called step()) it is relative to the summed time.
    """
    events = list(prof.key_averages())
    on_device = any(_event_time_us(e, True) > 0 for e in events)
    step_events = [e for e in events if _is_step_marker(e.key)]
    steps = sum(int(getattr(e, "count", 1)) for e in step_events)
    step_time = sum(float(getattr(e, "cpu_time_total", 0.0)) for e in step_events)
    rows = [(e, _event_time_us(e, on_device)) for e in events if not _is_step_marker(e.key)]
    rows = [r for r in rows if r[1] > 0]
    rows.sort(key=lambda r: r[1], reverse=True)
    total = sum(t for _, t in rows)
    denom = step_time if step_time > 0 else total
    basis = "wall time of the profiled steps" if step_time > 0 else "summed self time"
    clock = "device (CUDA) self time" if on_device else "CPU self time"
    lines = [
        f"Top {min(n, len(rows))} ops by {clock}; share of the {basis}"
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
                      f"all recorded ops {100.0 * total / denom:.1f}%."]
    return "\n".join(lines) + "\n"


class StepProfiler:
    """torch.profiler over a window of training steps; call `.step()` once per optimizer step.

    Skips `wait` steps, warms up for `warmup` (collects, discards), records `steps`, then writes
    into out_dir: trace_step<N>.json (Chrome / Perfetto), tb/ (TensorBoard's profiler plugin
    layout, when tensorboard is installed) and profile_top_kernels.md, and prints the table.
    `steps <= 0` makes it inert, so a loop can always build one from its config.
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
        if self._done:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if markers._cuda_present():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._tb_handler = None
        if _tensorboard_importable():
            self._tb_handler = torch.profiler.tensorboard_trace_handler(str(self.out_dir / "tb"))
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=self.steps, repeat=1),
            on_trace_ready=self._on_trace_ready,
            record_shapes=record_shapes,
        )
        self._prof.start()
        self._enter_count()

    @classmethod
    def from_config(cls, profile_cfg: Any, default_out_dir: str | Path, **kwargs: Any) -> StepProfiler:
        """From a section with `.steps` and `.out_dir` (ProfileConfig); '' out_dir -> default_out_dir."""
        out = getattr(profile_cfg, "out_dir", "") or default_out_dir
        return cls(out, int(getattr(profile_cfg, "steps", 0)), **kwargs)

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
    def total_steps(self) -> int:
        """Calls of step() the window spans: wait + warmup + steps."""
        return self.wait + self.warmup + max(self.steps, 0)

    def step(self) -> None:
        """Mark the end of one training step; finishes the profile after the window."""
        if self._done:
            return
        self._prof.step()
        self._calls += 1
        if self._calls >= self.total_steps:
            self.close()

    def _on_trace_ready(self, prof: Any) -> None:
        self.trace_path = self.out_dir / f"trace_step{prof.step_num}.json"
        prof.export_chrome_trace(str(self.trace_path))
        if self._tb_handler is not None:
            try:
                self._tb_handler(prof)
            except Exception as e:  # the Chrome trace is already written; TB is a convenience
                print(f"profiler: TensorBoard trace not written ({e})")
        self.table = top_kernels_table(prof, self.top_n)
        self.table_path = self.out_dir / TOP_KERNELS_FILE
        header = (f"# Profile: top ops\n\nsteps recorded: {self.steps} (after {self.wait} skipped, "
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
