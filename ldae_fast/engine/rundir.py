"""A run owns its directory: an exclusive lock while it runs, and no silent reuse of an old run.

The lock is OUT/.lock, created with O_EXCL and holding "PID HOST"; it is removed when the run
ends. A lock whose process is gone (a kill -9, a lost node) is stale and taken over with a
warning. A fresh run (no resume) into a directory that already holds checkpoints is refused,
unless engine.overwrite deletes them first: otherwise the old run's higher step numbers would
win keep_last and prune the new run's checkpoints, and a later --resume auto would resume the
old run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..errors import RunDirError

LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(lock: Path) -> tuple[int, str] | None:
    try:
        pid_s, _, host = lock.read_text().strip().partition(" ")
        return int(pid_s), host
    except (OSError, ValueError):
        return None


def acquire(out_dir: str | Path) -> Path:
    """Create OUT/.lock or raise RunDirError naming the run that holds it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _holder(lock)
            if held is None:
                # Being written by its creator right now, or left empty by a crash in between.
                import time
                time.sleep(0.2)
                held = _holder(lock)
                if held is None:
                    warnings.warn(f"removing an unreadable lock file {lock}", stacklevel=2)
                    lock.unlink(missing_ok=True)
                    continue
            pid, host = held
            if host == socket.gethostname() and not _alive(pid):
                warnings.warn(f"taking over the stale lock {lock} of process {pid}, which is gone",
                              stacklevel=2)
                lock.unlink(missing_ok=True)
                continue
            raise RunDirError(f"engine.out_dir={out} is in use by another run (process {pid} on {host}, "
                              f"lock file {lock}); wait for it, choose another --engine.out_dir, or "
                              f"delete the lock if that process is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        atexit.register(release, lock)
        return lock
    raise RunDirError(f"cannot take the lock {lock} (it keeps reappearing)")


def release(lock: Path) -> None:
    held = _holder(lock)
    if held is not None and held[0] == os.getpid():
        lock.unlink(missing_ok=True)


def check_fresh(out_dir: str | Path, resume: str, overwrite: bool, is_main: bool) -> None:
    """Refuse (or, with overwrite, clear) old checkpoints under a fresh run's out_dir."""
    if resume:
        return
    root = Path(out_dir) / "checkpoints"
    old = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
    if not old:
        return
    if not overwrite:
        raise RunDirError(
            f"engine.out_dir={out_dir} already holds checkpoints of an earlier run (newest {old[-1]}); "
            "resume it with --engine.resume=auto, choose another --engine.out_dir, or pass "
            "--engine.overwrite=true to delete them")
    if is_main:
        shutil.rmtree(root)
        # The old run's metric lines would otherwise be read as this run's.
        (Path(out_dir) / "metrics.jsonl").unlink(missing_ok=True)
        warnings.warn(f"engine.overwrite: deleted {len(old)} checkpoint(s) of an earlier run under {root} "
                      "and its metrics.jsonl", stacklevel=2)


@contextmanager
def owned(out_dir: str | Path, resume: str, overwrite: bool, is_main: bool):
    """The run's hold on out_dir: the fresh-run rule, then the lock (rank 0) until the end."""
    lock = acquire(out_dir) if is_main else None
    try:
        check_fresh(out_dir, resume, overwrite, is_main)
        yield
    finally:
        if lock is not None:
            release(lock)
