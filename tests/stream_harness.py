"""What the streaming probe's and fine-tune's tests share with their harness scripts
(tests/probe_harness.py, tests/finetune_harness.py, each run as a subprocess on 1 or N gloo ranks):
the harnesses' flags, splits, launch and exit; the tests' run and kill -9 of a harness."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))


# The harness side ------------------------------------------------------------------------------
def parser(micro: int) -> argparse.ArgumentParser:
    """The flags every harness takes: shard root, output file, checkpoint dir, a sleep per step (to
    be killed mid-run), world size, micro-batch, data workers, stop after N steps."""
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--micro", type=int, default=micro)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--stop-after", type=int, default=0)
    return ap


def launch(run: Callable[[int, argparse.Namespace], None], a: argparse.Namespace) -> None:
    """`run(rank, a)` on `a.world` spawned ranks, or here for one."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.world > 1:
        torch.multiprocessing.spawn(run, args=(a,), nprocs=a.world)
    else:
        run(0, a)


def join(rank: int, a: argparse.Namespace) -> None:
    """One thread; this rank's place in the gloo group (a file rendezvous beside the output)."""
    torch.set_num_threads(1)
    if a.world > 1:
        dist.init_process_group("gloo", init_method=f"file://{a.out}.rdv", rank=rank, world_size=a.world)


def splits(root: str, train: Optional[dict] = None, val: Optional[dict] = None):
    """(train, val) SplitSpecs over the shards of the `stream_shards` fixture's layout at 16 px,
    4 logical readers; `train` / `val`: more SplitSpec fields."""
    from ldae_fast.data.urls import expand_urls
    from ldae_fast.eval.stream import SplitSpec

    r = Path(root)
    tr = SplitSpec(tuple(expand_urls(str(r / "train-{000000..000003}.tar"), "train")), "train", 16, True,
                   shuffle_buffer=8, seed=1, readers=4, **(train or {}))
    va = SplitSpec(tuple(expand_urls(str(r / "val-000000.tar"), "val")), "val", 16, False, readers=4, **(val or {}))
    return tr, va


def pause(a: argparse.Namespace) -> Callable[[int], None]:
    """The on_step callback: `--sleep` seconds after each step, so a test can kill the run mid-way."""

    def on_step(_done: int) -> None:
        if a.sleep:
            time.sleep(a.sleep)

    return on_step


def finish(rank: int, a: argparse.Namespace, res: dict, tensors: Callable[[dict], dict]) -> None:
    """Rank 0 writes `tensors(res)` (or where a `--stop-after` run stopped) to the output file; then
    every rank leaves the group."""
    if rank == 0 and "stopped_at" in res:
        torch.save({"stopped_at": torch.tensor(res["stopped_at"])}, a.out)
    elif rank == 0:
        torch.save(tensors(res), a.out)
    if a.world > 1:
        # Every rank past its last collective and rank 0's save before any tears gloo down: a rank
        # that destroys its group while a peer is still in it can abort the peer at exit.
        dist.barrier()
        dist.destroy_process_group()
        # Skip the interpreter's teardown, where a freed gloo group can still abort the process
        # (ldae_fast.errors._leave_torchrun does the same for the commands under torchrun).
        sys.stdout.flush()
        os._exit(0)


# The test side ---------------------------------------------------------------------------------
def run_harness(script: Path, root, out: Path, *args: str, timeout: float) -> dict:
    """Run the harness to its end and load what it wrote; a failure shows its stderr."""
    p = subprocess.run([sys.executable, str(script), str(root), str(out), *args], env=ENV,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"harness {' '.join(args)} exited {p.returncode}:\n{p.stderr[-4000:]}"
    return torch.load(out, weights_only=True)


def kill_9_once_checkpointed(cmd: list[str], ckpt_dir: Path, pattern: str, at_least: int,
                             env: dict = ENV, limit_s: float = 600.0, poll_s: float = 0.05) -> Optional[Path]:
    """Start `cmd`, SIGKILL it as soon as a checkpoint `ckpt_dir`/`pattern` holds step >= `at_least`
    (or when it ended, or after `limit_s`, which only guards a hang); that checkpoint, or None."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    state = None
    while state is None and time.monotonic() - t0 < limit_s and p.poll() is None:
        for found in (ckpt_dir.glob(pattern) if ckpt_dir.exists() else ()):
            try:
                if int(torch.load(found, weights_only=True)["step"]) >= at_least:
                    state = found
            except (RuntimeError, OSError, EOFError):
                pass
        time.sleep(poll_s)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return state


def kill_9_then_rerun(script: Path, root, tmp_path: Path, pattern: str, *, limit_s: float,
                      timeout: float) -> tuple[int, dict]:
    """The harness with a checkpoint every step in `tmp_path`/ck and a sleep after each, killed -9
    once a checkpoint holds step >= 3 (of the harness's 9), then run again to its end: (the step
    it was killed at, the rerun's result)."""
    ck, cut = tmp_path / "ck", tmp_path / "cut.pt"
    state = kill_9_once_checkpointed([sys.executable, str(script), str(root), str(cut), "--ckpt", str(ck),
                                      "--sleep", "0.5"], ck, pattern, 3, limit_s=limit_s)
    assert state is not None, "no checkpoint at step >= 3 before the run ended"
    step = int(torch.load(state, weights_only=True)["step"])
    assert 3 <= step < 9 and not cut.exists(), "killed mid-run"
    return step, run_harness(script, root, cut, "--ckpt", str(ck), timeout=timeout)
