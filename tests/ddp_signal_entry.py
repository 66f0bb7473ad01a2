"""A torchrun entry for tests/test_ddp.py: train.py, except that one rank sends itself a signal
during one optimizer step, so only that rank receives it (the ranks must still stop together).

Environment: LDAE_TEST_SIGNAL_RANK, LDAE_TEST_SIGNAL_STEP (0-based), LDAE_TEST_SIGNAL (a name).
"""

import os
import signal
import sys

from ldae_fast.engine.ddp_backend import DDPBackend
from ldae_fast.train import main

if int(os.environ["RANK"]) == int(os.environ["LDAE_TEST_SIGNAL_RANK"]):
    real = DDPBackend.backward
    calls = {"n": 0}
    at = int(os.environ["LDAE_TEST_SIGNAL_STEP"])

    def backward(self, loss):
        if calls["n"] == at * self.cfg.engine.grad_accum:
            os.kill(os.getpid(), getattr(signal, os.environ["LDAE_TEST_SIGNAL"]))
        calls["n"] += 1
        return real(self, loss)

    DDPBackend.backward = backward

sys.exit(main(sys.argv[1:]))
