"""The checkpoint of a resumable streaming eval run (probe_stream, finetune_stream): one file per
fingerprint of the run's settings, `<dir>/<kind>-<fingerprint>.pt`, in a directory every rank sees
(eval/shared_dir.py); rank 0 writes it atomically with the data position of every logical reader,
and every rank resumes from it or none does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

from ldae_fast.errors import ResumeMismatch

from . import dist as edist
from .shared_dir import check_shared, load_agreed

Positions = dict[int, tuple[int, int]]  # logical reader -> (epoch, index in the epoch)


def atomic_save(obj: dict, path: Path) -> None:
    """A reader sees the old file or the whole new one, never a part (a kill mid-write)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StreamCheckpoint:
    """`<ckpt_dir>/<kind>-<fp>.pt`; `what` names the run in messages ("probe"), `flag` the option
    that gives the directory, `differs` what a fingerprint covers (said when one does not match)."""

    def __init__(self, ckpt_dir: str | os.PathLike, kind: str, fp: str, *, what: str, flag: str,
                 differs: str = "") -> None:
        self.path = Path(ckpt_dir) / f"{kind}-{fp}.pt"
        self.fp, self.what, self.flag, self.differs = fp, what, flag, differs

    def _load(self, path: Path) -> Optional[dict]:
        if not path.exists():
            return None
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if sd.get("fingerprint") != self.fp:
            why = f": {self.differs}" if self.differs else ""
            raise ResumeMismatch(f"{path}: saved by a {self.what} with other settings (fingerprint "
                                 f"{sd.get('fingerprint')} != {self.fp}{why}); use another {self.flag} "
                                 "or delete it")
        return sd

    def load(self) -> tuple[Optional[dict], Optional[Positions]]:
        """(the state, the readers' positions) every rank resumes from, or (None, None) for a fresh
        run; a collective."""
        check_shared(self.path.parent, self.flag)
        sd = load_agreed(self.path, self._load, self.flag)
        if sd is None:
            return None, None
        return sd, {int(r): (int(e), int(i)) for r, e, i in sd["positions"].tolist()}

    def save(self, state: Callable[[], dict], pos: Positions, main: bool) -> None:
        """Rank 0 writes `state()` with every rank's reader positions (`pos`: this rank's); a
        collective, so every rank calls it at the same step."""
        allpos: Positions = {}
        for part in edist.all_gather_objects(pos):
            allpos.update(part)
        if main:
            rows = torch.tensor([[r, e, i] for r, (e, i) in sorted(allpos.items())], dtype=torch.int64)
            atomic_save(dict(state(), positions=rows, fingerprint=self.fp), self.path)
        edist.barrier()


__all__ = ["StreamCheckpoint", "atomic_save", "Positions"]
