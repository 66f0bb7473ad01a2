"""Counting, logging and limiting bad samples.

A web-scale image set always holds a few broken records (truncated JPEGs, a member lost when a
shard was cut, a label file missing). One of them must never stop a week-long run, but a shard
set that is mostly broken must stop it early and loudly rather than train on whatever survives.
"""

from __future__ import annotations

import logging

from ..errors import DataError

log = logging.getLogger("ldae_fast.data")

# Below this many samples a single bad one would already exceed any sensible fraction.
MIN_SAMPLES_BEFORE_LIMIT = 100
# Every bad sample is logged up to this many per process; after that only every 100th, so a
# badly broken set does not flood the log before the fraction limit trips.
_LOG_EACH_UP_TO = 50


class BadSampleCounter:
    """Good / bad sample counts of one reader (one worker process or the main process)."""

    def __init__(self, max_bad_fraction: float, what: str = "data") -> None:
        self.max_bad_fraction = max_bad_fraction
        self.what = what
        self.good = 0
        self.bad = 0
        self.recent: list[str] = []
        # Off while a resumed reader replays samples it already delivered before the restart.
        self.enabled = True

    @property
    def total(self) -> int:
        return self.good + self.bad

    def ok(self) -> None:
        if not self.enabled:
            return
        self.good += 1
        if self.bad:
            self.check()

    def record(self, shard: str, key: str, reason: str) -> None:
        """Count one bad sample, log it with its shard and key, raise past the limit."""
        if not self.enabled:
            return
        self.bad += 1
        line = f"shard {shard} key {key!r}: {reason}"
        self.recent = (self.recent + [line])[-5:]
        if self.bad <= _LOG_EACH_UP_TO or self.bad % 100 == 0:
            log.warning("skipping bad sample #%d (%d good so far) in %s", self.bad, self.good, line)
        self.check()

    def check(self) -> None:
        if self.total < MIN_SAMPLES_BEFORE_LIMIT:
            return
        frac = self.bad / self.total
        if frac > self.max_bad_fraction:
            raise DataError(
                f"too many bad samples in {self.what}: {self.bad} of {self.total} "
                f"({frac:.2%}) exceed data.max_bad_fraction={self.max_bad_fraction:g}. "
                f"Last ones: {'; '.join(self.recent)}. Check the shards (e.g. re-run "
                f"`ldae-fast make-shards`) or raise data.max_bad_fraction."
            )
