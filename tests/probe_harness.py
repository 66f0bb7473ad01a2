"""Runs eval.probe_stream.run_probe on tiny shards with a stand-in encoder, on 1 or N gloo ranks;
the probe tests start it as a subprocess (kill -9, world sizes). Writes the head's state to OUT."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


class StandIn(nn.Module):
    """A frozen 'encoder': patchify conv + mean pool, seeded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 12, 4, stride=4)
        self.num_features = 12

    def pooled(self, x, pool="avg"):
        return self.conv(x).flatten(2).mean(2)


def _run(rank: int, a) -> None:
    torch.set_num_threads(1)
    if a.world > 1:
        dist.init_process_group("gloo", init_method=f"file://{a.out}.rdv", rank=rank, world_size=a.world)
    from ldae_fast.data.urls import expand_urls
    from ldae_fast.eval.probe_stream import ProbeSettings, run_probe
    from ldae_fast.eval.stream import SplitSpec

    root = Path(a.root)
    tr = SplitSpec(tuple(expand_urls(str(root / "train-{000000..000003}.tar"), "train")), "train", 16, True,
                   shuffle_buffer=8, seed=1, readers=4)
    va = SplitSpec(tuple(expand_urls(str(root / "val-000000.tar"), "val")), "val", 16, False, readers=4)
    s = ProbeSettings(epochs=a.epochs, global_batch=16, micro_batch=a.micro, blr=0.5, num_train=48,
                      num_classes=4, seed=0)

    def on_step(done):
        if a.sleep:
            time.sleep(a.sleep)

    # --local-ckpt: each rank its own directory, as on node-local disks of several nodes.
    ckpt = (f"{a.ckpt}/rank{rank}" if a.local_ckpt else a.ckpt) or None
    res = run_probe(StandIn(), tr, va, s, ckpt_dir=ckpt, ckpt_every=1, encoder_key="standin",
                    num_workers=a.workers, on_step=on_step, log=print if rank == 0 else None,
                    stop_after=a.stop_after)
    if rank == 0 and "stopped_at" in res:
        torch.save({"stopped_at": torch.tensor(res["stopped_at"])}, a.out)
    elif rank == 0:
        torch.save(dict(res["state"], top1=torch.tensor(res["top1"]), resumed=torch.tensor(res["resumed_from"]),
                        val=torch.tensor(res["val_images"])), a.out)
    if a.world > 1:
        # Every rank past its last collective and rank 0's save before any tears gloo down: a rank
        # that destroys its group while a peer is still in it can abort the peer at exit.
        dist.barrier()
        dist.destroy_process_group()
        # Skip the interpreter's teardown, where a freed gloo group can still abort the process
        # (ldae_fast.errors._leave_torchrun does the same for the commands under torchrun).
        sys.stdout.flush()
        os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--local-ckpt", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--stop-after", type=int, default=0)
    a = ap.parse_args()
    if a.world > 1:
        torch.multiprocessing.spawn(_run, args=(a,), nprocs=a.world)
    else:
        _run(0, a)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
