"""A train.py entry for tests/test_reshard_wds.py (plain or under torchrun): each rank appends
"epoch id" of every shard sample its readers deliver to LDAE_TEST_RECORD/rank<R>.txt (the shards'
labels are sample ids; data.num_workers=0, so these are the samples of the batches trained on), and
with LDAE_TEST_STOP_AFTER set rank 0 sends itself SIGTERM during that optimizer step (1-based),
so the run stops there with a checkpoint (engine/preempt.py).
"""

import os
import signal
import sys
from pathlib import Path

from ldae_fast.data import sources
from ldae_fast.engine import preempt
from ldae_fast.train import main

RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
real_positions = sources.WdsTrainSource._positions


def positions(self, slot, role, counter):
    # The tokenizer's fit reads its own one-rank stream: only the training stream is recorded.
    log = open(Path(os.environ["LDAE_TEST_RECORD"]) / f"rank{RANK}.txt", "a") if self.world_size == WORLD else None
    for epoch, i, raw in real_positions(self, slot, role, counter):
        if log is not None:
            log.write(f"{epoch} {raw.label}\n")
            log.flush()
        yield epoch, i, raw


sources.WdsTrainSource._positions = positions

if RANK == 0 and os.environ.get("LDAE_TEST_STOP_AFTER"):
    real_done, done = preempt.StopWatch.step_done, {"n": 0}

    def step_done(self):
        done["n"] += 1
        if done["n"] == int(os.environ["LDAE_TEST_STOP_AFTER"]):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_done(self)

    preempt.StopWatch.step_done = step_done

sys.exit(main(sys.argv[1:]))
