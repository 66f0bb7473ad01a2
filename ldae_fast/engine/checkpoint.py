"""Checkpoints: one directory per step, written atomically, verified when found again.

Layout: OUT/checkpoints/step_00001234/{state.pt, meta.json} (+ ds/ for DeepSpeed), and
OUT/checkpoints/latest, a small file naming the newest complete checkpoint. A checkpoint is
written into a temporary sibling directory and renamed into place, and meta.json is written
last, so a directory named step_* without meta.json (a crash mid-write, a copy cut short) is
never taken as complete.

Format version 2 (meta.json "format_version"): state.pt holds tensors and plain containers only
(dict, list, tuple, str, int, float, bool, None), so it loads with torch.load(weights_only=True)
and loading a checkpoint never runs code; meta.json records the SHA-256 of every file of the
checkpoint ("files"), checked before a resume. Checkpoints of version 1 (the numpy RNG state
pickled as objects) are refused, never unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, FileProblem

FORMAT_VERSION = 2
_STEP_RE = re.compile(r"^step_(\d+)$")
LATEST = "latest"
# Test hook: SIGKILL this process at a named point of the write, to prove a crash there is safe.
KILL_ENV = "LDAE_CKPT_KILL_AT"
KILL_POINTS = ("after_state", "after_meta", "before_pointer")


def _kill_point(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def ckpt_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_of(d: Path) -> int:
    m = _STEP_RE.match(d.name)
    return int(m.group(1)) if m else -1


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (no numpy objects: weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                    "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def is_complete(d: Path) -> bool:
    return d.is_dir() and _STEP_RE.match(d.name) is not None and (d / "meta.json").is_file()


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = ckpt_root(out_dir)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if is_complete(d)]
    return sorted(found, key=step_of)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    cks = list_checkpoints(out_dir)
    return cks[-1] if cks else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hash_tree(d: Path) -> dict[str, str]:
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != "meta.json")
    for p in files:
        _fsync_file(p)
    return {p.relative_to(d).as_posix(): sha256_file(p) for p in files}


def write_latest_pointer(out_dir: str | Path, ckpt: Path) -> None:
    root = ckpt_root(out_dir)
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(ckpt.name + "\n")
    os.replace(tmp, root / LATEST)


def read_latest_pointer(out_dir: str | Path) -> Path | None:
    p = ckpt_root(out_dir) / LATEST
    try:
        name = p.read_text().strip()
    except OSError:
        return None
    d = ckpt_root(out_dir) / name
    return d if _STEP_RE.match(name) and is_complete(d) else None


class CheckpointWriteError(FileProblem):
    """A checkpoint could not be written (disk full, quota, file size limit); the temporary
    directory is gone and the previous checkpoint is untouched."""

    category = "checkpoint write error"


_WRITE_CAUSES = {errno.ENOSPC: "no space left on the device",
                 errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file too large (a file size limit, e.g. `ulimit -f`)"}


def _write_cause(e: BaseException, where: Path) -> str:
    """What stopped a write, in words. torch.save reports a failed write as 'unexpected pos';
    the OSError behind it is in the exception's context when it wrote through a Python file."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return _WRITE_CAUSES.get(seen.errno, f"{seen.strerror or seen} (errno {seen.errno})")
        seen = seen.__cause__ or seen.__context__
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"probably a file size limit ({limit} bytes, `ulimit -f`)"
    try:
        if shutil.disk_usage(where).free < (64 << 20):
            return f"probably no space left on the device ({shutil.disk_usage(where).free} bytes free)"
    except OSError:
        pass
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _save_tensors(state: dict[str, Any], path: Path) -> None:
    # Through a Python file, so a failed write keeps its OSError (errno) for the message.
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(out_dir: str | Path, step: int, state: dict[str, Any], keep_last: int,
                     extra_meta: dict | None = None, writer=None, is_main: bool = True,
                     barrier=None, any_failed=None) -> Path:
    """Write `state` for `step` atomically; prune to the newest `keep_last` complete ones.

    `state` must be finite (the loop checks before calling) and hold tensors and plain
    containers only. `writer(tmp_dir)` may write additional files before the rename (DeepSpeed's
    sharded state). In a multi-rank run every rank calls this with `barrier` set: rank 0 owns the
    directory and the rename, every rank runs `writer` into the same temporary directory.
    A write that fails (no space, quota, file size limit) removes the temporary directory and
    raises CheckpointWriteError naming the directory, the cause and the previous checkpoint.
    `any_failed(failed_here) -> bool` (a collective every rank calls, in place of the barrier after
    each stage) lets every rank learn of a failure on another one, so none renames a checkpoint
    with a part missing and all raise alike.
    """
    def sync() -> None:
        if barrier is not None:
            barrier()

    root = ckpt_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    previous = latest_checkpoint(out_dir) if is_main else None
    failed: BaseException | None = None

    def attempt(part) -> None:
        nonlocal failed
        if failed is None:
            try:
                part()
            except (OSError, RuntimeError) as e:
                failed = e

    def start() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def finish() -> None:
        _save_tensors(state, tmp / "state.pt")
        _kill_point("after_state")
        meta = {"format_version": FORMAT_VERSION, "step": step, "time": time.time(), "finite": True,
                **(extra_meta or {}), "files": _hash_tree(tmp)}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        _kill_point("after_meta")
        if final.exists():  # re-saving the same step (e.g. end of run == periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)

    def stage_done() -> None:
        """Barrier; with `any_failed`, also learn whether any rank has failed so far."""
        nonlocal failed
        if any_failed is None:
            sync()
        elif any_failed(failed is not None) and failed is None:
            failed = OSError(f"another rank could not write its part of {tmp}")

    # Every rank passes every barrier, failed or not, so a failure never leaves the others waiting.
    if is_main:
        attempt(start)
    stage_done()
    if writer is not None:
        attempt(lambda: writer(tmp))
    stage_done()
    if is_main:
        attempt(finish)
    if any_failed is not None:
        stage_done()
    if failed is not None:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        sync()
        kept = ("the previous checkpoint is untouched" if not is_main
                else f"the previous checkpoint {previous} is intact"
                if previous is not None and is_complete(previous) else "no earlier checkpoint exists")
        raise CheckpointWriteError(f"could not write the checkpoint of step {step} into {root}: "
                                   f"{_write_cause(failed, root)}; the partial write was removed and "
                                   f"{kept}") from failed
    if is_main:
        _kill_point("before_pointer")
        try:
            write_latest_pointer(out_dir, final)
        except OSError as e:  # the checkpoint itself is complete; resume lists directories
            warnings.warn(f"{root / LATEST} not updated ({_write_cause(e, root)}); {final} is complete",
                          stacklevel=2)
        _prune(out_dir, keep_last, just_written=final)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    sync()
    return final


def _read_meta(d: Path) -> dict:
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: meta.json is unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{d}: meta.json is not a JSON object")
    return meta


def _prune(out_dir: str | Path, keep_last: int, just_written: Path) -> None:
    """Delete all but the newest `keep_last`; never the one just written, never the newest good
    one (finite, and not written while the divergence guard was counting): a good checkpoint must
    survive whatever comes after it."""
    cks = list_checkpoints(out_dir)
    protect = {just_written.name}
    good = newest_good(out_dir)
    if good is not None:
        protect.add(good.name)
    for old in cks[:-keep_last]:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)


def _check_format(d: Path) -> dict:
    meta = _read_meta(d)
    v = meta.get("format_version", 1)
    if v != FORMAT_VERSION:
        raise CheckpointError(
            f"{d} has checkpoint format version {v}; this ldae-fast reads version {FORMAT_VERSION} "
            "only (version 1 pickles Python objects, which could run code when loaded, so it is never "
            "unpickled); start a new run, or convert it with the ldae-fast that wrote it and a "
            "trusted `torch.load`")
    return meta


def verify_checkpoint(d: Path) -> str | None:
    """None when every file of checkpoint `d` is present with its recorded SHA-256, else what
    is wrong (an unreadable meta.json among them). Raises CheckpointError for a checkpoint of
    another format version."""
    try:
        _read_meta(d)
    except CheckpointError as e:
        return str(e).removeprefix(f"{d}: ")
    meta = _check_format(d)
    files = meta.get("files")
    if not isinstance(files, dict) or "state.pt" not in files:
        return "meta.json lists no file checksums"
    for rel, want in files.items():
        p = d / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size == 0:
            return f"{rel} is empty (zero bytes)"
        if sha256_file(p) != want:
            return f"{rel} does not match its SHA-256 in meta.json (truncated or altered)"
    return None


def is_diverging(d: Path) -> bool:
    """Whether checkpoint `d` was written while the divergence guard was counting bad log lines."""
    try:
        return bool(_read_meta(d).get("diverging", False))
    except CheckpointError:
        return False


def _newest_intact(out_dir: Path, what: str) -> Path | None:
    """The newest intact checkpoint that was not written while the run was diverging; the newest
    intact one when every intact one was (with a warning saying so)."""
    cks = list_checkpoints(out_dir)
    diverging: list[Path] = []
    for d in reversed(cks):
        bad = verify_checkpoint(d)
        if bad is not None:
            older = "an older one" if d is not cks[0] else "nothing older"
            warnings.warn(f"checkpoint {d} is damaged ({bad}); not resuming from it, trying {older}",
                          stacklevel=3)
            continue
        if not is_diverging(d):
            if diverging:
                warnings.warn(f"{len(diverging)} newer checkpoint(s) ({', '.join(p.name for p in diverging)}) "
                              "were written while the run was diverging (gradient norm non-finite or above "
                              f"engine.diverge_grad_norm); resuming from {d.name}, the newest one written "
                              "before that", stacklevel=3)
            return d
        diverging.append(d)
    if diverging:
        warnings.warn(f"every intact checkpoint under {ckpt_root(out_dir)} was written while the run was "
                      f"diverging; resuming from the newest, {diverging[0].name} (consider a lower "
                      "--optim.blr or --optim.clip_grad)", stacklevel=3)
        return diverging[0]
    if cks:
        raise CheckpointError(f"{what}: none of the {len(cks)} checkpoint(s) under {ckpt_root(out_dir)} "
                              "is intact (see the warnings above)")
    return None


def resolve_resume(resume: str, out_dir: str | Path, flag: str = "--resume") -> Path | None:
    """'' -> None; 'auto' -> newest intact checkpoint in out_dir or None; a path -> that
    checkpoint (verified), or the newest intact one of that run directory (or of its
    checkpoints/ folder). `flag` is how the caller's user spells the path in messages."""
    if not resume:
        return None
    if resume == "auto":
        return _newest_intact(Path(out_dir), "--engine.resume=auto")
    p = Path(resume)
    if p.is_file() and p.name == "state.pt":
        p = p.parent
    if not p.exists():
        raise FileNotFoundError(f"{flag} {resume}: no such checkpoint")
    if p.is_dir() and not is_complete(p) and p.name == "checkpoints" and not list_checkpoints(p):
        p = p.parent  # OUT/checkpoints given for OUT
    if p.is_dir() and not is_complete(p):
        latest = _newest_intact(p, f"{flag} {resume}")  # a run directory was given
        if latest is None:
            raise FileNotFoundError(f"{flag} {resume}: not a complete checkpoint (no meta.json) "
                                    f"and no complete checkpoint under {p / 'checkpoints'}")
        return latest
    if not p.is_dir():
        raise CheckpointError(f"{flag} {resume}: not a checkpoint (a step_*/ directory with meta.json, or "
                              "the run directory holding checkpoints/)")
    bad = verify_checkpoint(p)
    if bad is not None:
        raise CheckpointError(f"checkpoint {p} is damaged: {bad}")
    return p


def _why(e: Exception) -> str:
    """The line of torch's weights_only refusal that names the offending object."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "Unsupported" in ln or "GLOBAL" in ln]
    return (named or lines or [type(e).__name__])[0][:200]


@contextmanager
def weights_only_loads(allow: tuple = ()):
    """Make every torch.load inside (DeepSpeed's own loads among them) refuse pickled objects,
    except instances of the plain-data classes in `allow` (rebuilt from their fields, no code)."""
    real = torch.load

    def guarded(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = guarded
    try:
        with torch.serialization.safe_globals(list(allow)):
            yield
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"a checkpoint file holds pickled objects, not only tensors; refusing to "
                              f"load it ({_why(e)})") from None
    finally:
        torch.load = real


def load_state(ckpt: str | Path, map_location="cpu") -> dict[str, Any]:
    """state.pt of a format-2 checkpoint, loaded without running any code from it."""
    d = Path(ckpt)
    _check_format(d)
    try:
        st = torch.load(d / "state.pt", map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{d / 'state.pt'} holds pickled objects, not only tensors and plain "
                              f"containers; refusing to load it ({_why(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{d / 'state.pt'} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(st, dict):
        raise CheckpointError(f"{d / 'state.pt'} does not hold a checkpoint dict")
    return st


def method_state(state: dict) -> dict | None:
    """The method's part of a checkpoint (its tokenizer and whatever else it keeps). Checkpoints
    from before format 2 kept the tokenizer at the top level; they are refused at load
    (`_check_format`), never unpickled."""
    return state.get("method") or None


def newest_good(out_dir: str | Path) -> Path | None:
    """Newest complete format-2 checkpoint recorded as finite and not written during a run of
    diverged log lines (its files are not re-hashed)."""
    for d in reversed(list_checkpoints(out_dir)):
        try:
            meta = _read_meta(d)
        except CheckpointError:
            continue
        if (meta.get("format_version") == FORMAT_VERSION and meta.get("finite") is True
                and not meta.get("diverging", False)):
            return d
    return None
