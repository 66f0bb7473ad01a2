"""User errors and the one wrapper every command runs under.

A user error (a bad flag, a missing file, broken data, a diverging run, a busy run directory) is
not a bug: it ends as ONE line on stderr naming the field, file, shard or step, and an exit code
of its category, so scripts can tell them apart. `--debug` or LDAE_DEBUG=1 adds the traceback.
Anything else is a bug and keeps Python's traceback.

Exit codes (also in README, "Exit codes"):
  2  config or usage      a flag, a config field or a --config file
  3  non-finite loss      the loss became NaN/inf (names the step and the newest good checkpoint)
  4  file                 a named file or directory is missing, unreadable or unwritable (a checkpoint write)
  5  data                 shards missing or broken, labels missing, too many bad samples
  6  checkpoint           unsafe / old-format / corrupt checkpoint, nothing intact to resume
  7  resume mismatch      the checkpoint cannot be resumed as configured (another model; another
                          global batch without engine.resume_rebatch; ZeRO state on other ranks)
  8  divergence           the gradient norm stayed non-finite or above the bound
  9  run directory        another run holds the directory, or a fresh run would overwrite one;
                          an eval directory not every rank sees
  10 preempted            SIGTERM / SIGUSR1 / a first Ctrl-C / engine.stop_after: a checkpoint was
                          written; requeue with --engine.resume=auto (not an error, never 0)
  130 interrupted         a second Ctrl-C (or one outside training): nothing written
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem the user can fix; printed as one line, never as a traceback."""

    exit_code = 1
    category = "error"


class NonFiniteLoss(RuntimeError, FloatingPointError, UserError):
    """The loss became NaN/inf: training, a probe or a fine-tune. Also a FloatingPointError, so a
    caller that skips a diverging setting (a learning-rate sweep) catches every one the same way."""
    exit_code = 3
    category = "non-finite loss"


class UsageError(UserError):
    exit_code = 2
    category = "usage error"


class SpeedSwitchError(UsageError):
    """A speed switch that cannot run here (a missing optional package, no suitable device)."""

    category = "config error"


class FileProblem(UserError):
    exit_code = 4
    category = "file error"


class DataError(RuntimeError, UserError):
    """The data cannot be read as configured; the message says what and where."""

    exit_code = 5
    category = "data error"


class CheckpointError(UserError):
    """A checkpoint that must not or cannot be loaded."""

    exit_code = 6
    category = "checkpoint error"


class ResumeMismatch(RuntimeError, UserError):
    """A checkpoint that cannot be resumed as configured (model shape, batch split, method state)."""

    exit_code = 7
    category = "resume mismatch"


class RunDirError(UserError):
    exit_code = 9
    category = "run directory error"


class Preempted(UserError):
    """The run stopped early on request after writing a checkpoint to resume from."""

    exit_code = 10
    category = "preempted"


EXIT_CODES = {"config": 2, "non-finite": 3, "file": 4, "data": 5, "checkpoint": 6,
              "resume-mismatch": 7, "divergence": 8, "run-dir": 9, "preempted": 10,
              "interrupted": 130}


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are UsageError (one line) instead of usage text + SystemExit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def finite_float(text: str) -> float:
    """argparse type: a finite number (an inf or NaN rate would fail steps later, unnamed)."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    return "--debug" in argv or os.environ.get("LDAE_DEBUG", "").lower() in ("1", "true", "yes", "on")


def one_line(msg: object) -> str:
    text = str(msg)
    if "Original Traceback" in text:
        # Re-raised by a DataLoader from a worker: the message embeds the worker's traceback;
        # its last line is the original error.
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return " ".join(text.split())


def run_cli(fn: Callable[[list[str]], int | None], argv: Sequence[str] | None, prog: str) -> int:
    """fn(argv without --debug) -> exit code, with user errors turned into one stderr line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        code = int(fn(argv) or 0)
        _leave_torchrun(code)
        return code
    except UserError as e:
        err: BaseException = e
        code, text = e.exit_code, f"{e.category}: {one_line(e)}"
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # OS errors name their file; a raw one from deep inside is still the user's file.
        err, code = e, EXIT_CODES["file"]
        name = f"{e.filename}: " if getattr(e, "filename", None) and str(e.filename) not in str(e) else ""
        text = f"file error: {name}{one_line(e.strerror if name and e.strerror else e)}"
    except KeyboardInterrupt as e:
        err, code, text = e, EXIT_CODES["interrupted"], "interrupted"
    if debug:
        traceback.print_exception(err)
    print(f"{prog}: {text}", file=sys.stderr, flush=True)
    _leave_torchrun(code)
    return code


def _leave_torchrun(code: int) -> None:
    """A rank started by torchrun leaves its process group and exits here, skipping the
    interpreter's teardown: a gloo group freed by that teardown can abort a rank after its work is
    done ('terminate called without an active exception', SIGABRT), and torchrun then reports a
    finished run as failed. Every file the commands write is closed or line-buffered by now.
    In-process callers (no TORCHELASTIC_RUN_ID) return as usual."""
    dist = sys.modules.get("torch.distributed")
    if "TORCHELASTIC_RUN_ID" not in os.environ or dist is None or not dist.is_initialized():
        return
    try:
        if code == 0:
            dist.barrier()  # no rank tears down while a peer is still in the group
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving anyway; the exit code below says how the run ended
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
