"""Directories every rank reads: proven shared before use, and one resume decision for all ranks.

Rank 0 writes the probe's and the fine-tune's checkpoints and the ranks write one feature store
together; a rank on another node that cannot see those files would resume at another step (or
start afresh) while rank 0 resumes, and the collectives would then hang or mix steps. So a run
checks, before it starts, that a marker rank 0 writes in the directory is read back by every rank,
and a resume proceeds only when every rank loaded the checkpoint at rank 0's step. A failure is
raised on every rank at once (never on one rank while the others wait in a collective).
"""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from ldae_fast import errors
from ldae_fast.errors import FileProblem, RunDirError, UserError

from . import dist as edist

_SEEN_TRIES = 20
_SEEN_WAIT_S = 0.25  # a network filesystem may show a new file on other nodes a moment later


def _not_shared(directory: Path, flag: str, blind: list[tuple[int, str]]) -> RunDirError:
    who = ", ".join(f"{r} on {h}" for r, h in blind[:4]) + (" ..." if len(blind) > 4 else "")
    return RunDirError(f"{flag} {directory}: rank(s) {who} do not see what rank 0 wrote there; it must "
                       "be on a filesystem every node shares (not node-local disk such as /tmp)")


def check_shared(directory: Path, flag: str) -> None:
    """Create `directory` (rank 0) and prove every rank sees the same one, else RunDirError (exit 9)
    on every rank; one rank 0 cannot create is a FileProblem (exit 4) on every rank. On one
    process it is only created."""
    ranks = edist.current()
    directory = Path(directory)
    token = secrets.token_hex(8)
    marker = directory / f".shared-check-{token}"
    problem = None
    if ranks.main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if ranks.distributed:
                marker.write_text(token)
        except OSError as e:
            problem = f"{flag} {directory}: cannot be written ({e.strerror or e})"
    if ranks.distributed:
        token, problem = edist.all_gather_objects((token, problem) if ranks.main else None)[0]
        marker = directory / f".shared-check-{token}"
    if problem:
        raise FileProblem(problem)
    if not ranks.distributed:
        return
    seen = False
    for _ in range(_SEEN_TRIES):
        try:
            seen = marker.read_text() == token
        except OSError:
            seen = False
        if seen:
            break
        time.sleep(_SEEN_WAIT_S)
    everyone = edist.all_gather_objects((seen, socket.gethostname()))
    if ranks.main:
        marker.unlink(missing_ok=True)
    blind = [(r, h) for r, (ok, h) in enumerate(everyone) if not ok]
    if blind:
        raise _not_shared(directory, flag, blind)


def _raise_everywhere(err: Optional[UserError]) -> None:
    """Raise the first rank's user error (by rank) on every rank."""
    got = edist.all_gather_objects(None if err is None else (type(err).__name__, str(err)))
    for item in got:
        if item is not None:
            if err is not None:
                raise err
            cls = getattr(errors, item[0], None)
            raise (cls if isinstance(cls, type) and issubclass(cls, UserError) else RunDirError)(item[1])


def load_agreed(path: Path, load: Callable[[Path], Optional[dict]], flag: str) -> Optional[dict]:
    """`load(path)` (None: no checkpoint) on every rank; the state when every rank loaded one at
    rank 0's step, None when no rank has one, else RunDirError on every rank. A user error of
    one rank's load (another run's fingerprint) is raised on every rank."""
    sd, err = None, None
    try:
        sd = load(path)
    except UserError as e:
        err = e
    _raise_everywhere(err)
    steps = edist.all_gather_objects(None if sd is None else int(sd["step"]))
    if any(s != steps[0] for s in steps):
        hosts = edist.all_gather_objects(socket.gethostname())
        at = [f"rank {r} on {hosts[r]}: {'none' if s is None else f'step {s}'}" for r, s in enumerate(steps)
              if r == 0 or s != steps[0]]
        raise RunDirError(f"{flag} {path.parent}: the ranks see different checkpoints {path.name} ("
                          + "; ".join(at[:5]) + (" ..." if len(at) > 5 else "")
                          + "); it must be on a filesystem every node shares (not node-local disk)")
    return sd


__all__ = ["check_shared", "load_agreed"]
