"""eval/shared_dir.py on 2 gloo ranks: a directory one rank cannot see, ranks that would resume
at different steps, and one rank's refused checkpoint all stop every rank with the same error
(none is left waiting in a collective)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ldae_fast.errors import FileProblem, ResumeMismatch, RunDirError


def _case(rank: int, root: str, out: str) -> None:
    from ldae_fast.eval.shared_dir import check_shared, load_agreed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rdv", rank=rank, world_size=2)
    got = {}

    def attempt(name, fn):
        try:
            got[name] = ("ok", fn())
        except (RunDirError, ResumeMismatch, FileProblem) as e:
            got[name] = (type(e).__name__, str(e))

    shared = Path(root) / "shared"
    attempt("shared", lambda: check_shared(shared, "--probe-dir"))
    attempt("local", lambda: check_shared(Path(root) / f"node{rank}", "--probe-dir"))
    (Path(root) / "a-file").write_text("")
    attempt("unwritable", lambda: check_shared(Path(root) / "a-file" / "probe", "--probe-dir"))
    step = {0: 8, 1: 8}
    attempt("same", lambda: load_agreed(shared / "p.pt", lambda p: {"step": step[rank]}, "--probe-dir")["step"])
    step[1] = None
    attempt("stale", lambda: load_agreed(shared / "p.pt", lambda p: None if step[rank] is None else {"step": 8},
                                         "--finetune-dir"))

    def refused(p):
        if rank == 1:
            raise ResumeMismatch(f"{p}: saved by a probe with other settings")
        return {"step": 8}
    attempt("refused", lambda: load_agreed(shared / "p.pt", refused, "--probe-dir"))
    torch.save(got, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_every_rank_stops_on_a_directory_or_checkpoint_not_all_ranks_share(tmp_path):
    out = tmp_path / "got"
    torch.multiprocessing.spawn(_case, args=(str(tmp_path), str(out)), nprocs=2)
    got = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    for r, g in enumerate(got):
        assert g["shared"] == ("ok", None) and g["same"] == ("ok", 8)
        kind, msg = g["local"]
        assert kind == "RunDirError" and str(tmp_path / f"node{r}") in msg and "rank(s) 1 " in msg and "every node shares" in msg
        kind, msg = g["stale"]
        assert kind == "RunDirError" and "--finetune-dir" in msg and "rank 1" in msg and "none" in msg
        assert g["unwritable"][0] == "FileProblem" and "cannot be written" in g["unwritable"][1]
        assert g["refused"][0] == "ResumeMismatch" and "other settings" in g["refused"][1]
    assert not list((tmp_path / "shared").glob(".shared-check-*"))  # the markers are removed
