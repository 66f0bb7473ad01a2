"""Runs eval.probe_stream.run_probe on tiny shards with a stand-in encoder, on 1 or N gloo ranks;
the probe tests start it as a subprocess (kill -9, world sizes). Writes the head's state to OUT."""

from __future__ import annotations

import torch
from stream_harness import finish, join, launch, parser, pause, splits
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
    join(rank, a)
    from ldae_fast.eval.probe_stream import ProbeSettings, run_probe

    tr, va = splits(a.root)
    s = ProbeSettings(epochs=a.epochs, global_batch=16, micro_batch=a.micro, blr=0.5, num_train=48,
                      num_classes=4, seed=0)
    # --local-ckpt: each rank its own directory, as on node-local disks of several nodes.
    ckpt = (f"{a.ckpt}/rank{rank}" if a.local_ckpt else a.ckpt) or None
    res = run_probe(StandIn(), tr, va, s, ckpt_dir=ckpt, ckpt_every=1, encoder_key="standin",
                    num_workers=a.workers, on_step=pause(a), log=print if rank == 0 else None,
                    stop_after=a.stop_after)
    finish(rank, a, res, lambda r: dict(r["state"], top1=torch.tensor(r["top1"]),
                                        resumed=torch.tensor(r["resumed_from"]), val=torch.tensor(r["val_images"])))


def main() -> None:
    ap = parser(micro=16)
    ap.add_argument("--local-ckpt", action="store_true")
    ap.add_argument("--epochs", type=int, default=3)
    launch(_run, ap.parse_args())


if __name__ == "__main__":
    main()
