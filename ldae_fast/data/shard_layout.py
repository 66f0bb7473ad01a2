"""Which samples each reader of a shard epoch reads, and what an interrupted epoch has left.

A sample is named (u, k): shard u of data.train_shards, k-th readable sample of it in tar order
(what the shard reader yields: bad labels and missing images are not samples). A reader slot's
epoch is a list of pieces (u, ordinals) read in order, ordinals None meaning the whole shard, and
its samples pass through the shuffle buffer (shuffle.shuffled); its saved position (e, n) says
that the first n samples out of its buffer in epoch e are consumed, and every earlier epoch.

A run that never moved reads standard epochs: S slots, slot s reads whole shards
shard_order(e)[s::S]. A run resumed on another shape (rank count or workers) first finishes the
epochs its old slots left unfinished, each a *rest*: the shards no old slot had reached (whole)
and the loose samples (those left in the old shuffle buffers and the unread part of the shards
being read). New slot s of S reads its contiguous part of the loose samples, then whole[s::S];
later epochs are standard. So no sample of an interrupted epoch is seen twice, none is skipped,
and each later epoch is read once, in the new layout.

What the old slots consumed is recomputed, not stored: the shuffle buffer's draws are replayed
from its seed over sample names, counting the samples of the shards a slot had opened (tar
members read, nothing decoded). The position the new run saves keeps the old one as its
`origin`, so a run moved twice within an epoch (2 ranks -> 1 -> 2) recomputes both legs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from .shuffle import buffer_rng, shard_order

Piece = tuple[int, "list[int] | None"]
SampleId = tuple[int, int]


class Rest:
    """What an interrupted epoch has left: whole shards, then loose samples."""

    def __init__(self, whole: list[int], loose: list[SampleId]) -> None:
        self.whole, self.loose = whole, loose

    def __bool__(self) -> bool:
        return bool(self.whole or self.loose)


class Layout:
    """The pieces slot s of `slots` reads in epoch e: a rest epoch's share or a standard one."""

    def __init__(self, num_shards: int, seed: int, slots: int, rests: dict[int, Rest] | None = None) -> None:
        self.num_shards, self.seed, self.slots = num_shards, seed, slots
        self.rests = rests or {}

    def pieces(self, slot: int, epoch: int) -> list[Piece]:
        rest = self.rests.get(epoch)
        if rest is None:
            return [(u, None) for u in shard_order(self.num_shards, self.seed, epoch)[slot::self.slots]]
        m = len(rest.loose)
        mine = rest.loose[slot * m // self.slots:(slot + 1) * m // self.slots]
        out: list[Piece] = []
        for u, k in mine:  # consecutive samples of one shard: one piece
            if out and out[-1][0] == u:
                out[-1][1].append(k)  # type: ignore[union-attr]
            else:
                out.append((u, [k]))
        return out + [(u, None) for u in rest.whole[slot::self.slots]]

    def is_rest(self, epoch: int) -> bool:
        return epoch in self.rests


def _slot_left(pieces: list[Piece], n: int, bufsize: int, rng: random.Random,
               count: Callable[[int], int]) -> tuple[list[int], list[SampleId]]:
    """(whole shards, loose samples) a slot had not consumed once n samples left its buffer:
    shuffle.shuffled's draws replayed over sample names."""
    state = {"piece": 0, "ids": None, "pos": 0}

    def pull() -> SampleId | None:
        while state["piece"] < len(pieces):
            if state["ids"] is None:
                u, ks = pieces[state["piece"]]
                state["ids"] = [(u, k) for k in (range(count(u)) if ks is None else ks)]
                state["pos"] = 0
            ids = state["ids"]
            if state["pos"] < len(ids):
                state["pos"] += 1
                return ids[state["pos"] - 1]
            state["piece"], state["ids"] = state["piece"] + 1, None
        return None

    out = 0
    buf: list[tuple[int, SampleId]] = []  # (input order, sample): the leftovers keep reading order
    seq = 0
    if n > 0:
        if bufsize <= 1:
            while out < n and pull() is not None:
                out += 1
        else:
            while out < n:
                x = pull()
                if x is None:
                    break
                seq += 1
                if len(buf) < bufsize:
                    buf.append((seq, x))
                    continue
                j = rng.randrange(bufsize)
                buf[j] = (seq, x)
                out += 1
            while out < n and buf:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                buf.pop()
                out += 1
    loose = [x for _, x in sorted(buf)]
    rest_from = state["piece"]
    if state["ids"] is not None:  # the piece being read: its unread samples are loose
        loose += state["ids"][state["pos"]:]
        rest_from += 1
    whole: list[int] = []
    for u, ks in pieces[rest_from:]:
        if ks is None:
            whole.append(u)
        else:
            loose += [(u, k) for k in ks]
    return whole, loose


def rests_of(origin: dict[str, Any] | None, num_shards: int, seed: int, bufsize: int,
             count: Callable[[int], int]) -> dict[int, Rest]:
    """The rest epochs of a run resumed from `origin` (the old run's shape, every old slot's
    position in slot order, and that run's own origin), by epoch; {} for a run that never moved."""
    if not origin:
        return {}
    old = Layout(num_shards, seed, int(origin["world_size"]) * int(origin["num_workers"]),
                 rests_of(origin.get("origin"), num_shards, seed, bufsize, count))
    positions = [(int(e), int(n)) for e, n in origin["positions"]]
    lo, hi = min(e for e, _ in positions), max(e for e, _ in positions)
    out: dict[int, Rest] = {}
    for e in range(lo, hi + 1):
        whole: list[int] = []
        loose: list[SampleId] = []
        for s, (es, n) in enumerate(positions):
            if es > e:
                continue
            pieces = old.pieces(s, e)
            w, ls = _slot_left(pieces, n if es == e else 0, bufsize, buffer_rng(seed, e, s), count)
            whole += w
            loose += ls
        rest = Rest(whole, loose)
        if rest:
            out[e] = rest
    # Rest epochs of the old layout that none of its slots had reached stay as they were.
    out.update({e: r for e, r in old.rests.items() if e > hi})
    return out


def last_epoch(origin: dict[str, Any] | None) -> int:
    """The last epoch that can be a rest epoch of a run resumed from `origin` (-1: none)."""
    if not origin:
        return -1
    return max(max(int(e) for e, _ in origin["positions"]), last_epoch(origin.get("origin")))


def resumed_origin(sd: dict[str, Any], every: list[tuple[int, int]]) -> dict[str, Any]:
    """The origin a run moved to another shape keeps: the saved shape, every old slot's position
    and the saved origin while one of those slots is still inside its epochs."""
    return {"world_size": int(sd["world_size"]), "num_workers": int(sd["num_workers"]),
            "positions": [[int(e), int(n)] for e, n in every],
            "origin": still_needed(sd.get("origin"), every)}


def still_needed(origin: dict[str, Any] | None, every: list[tuple[int, int]] | None) -> dict[str, Any] | None:
    """`origin` unless every slot (their positions `every`) is past its last rest epoch."""
    if origin and every and min(e for e, _ in every) > last_epoch(origin):
        return None
    return origin


__all__ = ["Layout", "Rest", "rests_of", "resumed_origin", "still_needed"]
