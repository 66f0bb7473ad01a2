"""Data order: each epoch's shard permutation and the shuffle buffer of raw samples."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch

from .badsamples import DataError
from .transforms import generator_for, mix_seed

# Domain tags for `generator_for` / `mix_seed` (the data pipeline's tags, 11-29, are listed in sources.py).
_TAG_SHARD_ORDER = 11
_TAG_BUFFER = 12


def shuffled(items: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle buffer; drained in random order when the input ends."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[Any] = []
    for x in items:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        j = rng.randrange(bufsize)
        out, buf[j] = buf[j], x
        yield out
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def buffer_rng(seed: int, epoch: int, slot: int) -> random.Random:
    """The shuffle buffer's generator of reader slot `slot` in epoch `epoch` of a shard stream."""
    return random.Random(mix_seed(seed, _TAG_BUFFER, epoch, slot))


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Epoch `epoch`'s shard permutation, identical on every rank."""
    return torch.randperm(num_shards, generator=generator_for(seed, _TAG_SHARD_ORDER, epoch)).tolist()


__all__ = ["shuffled", "shard_order", "buffer_rng"]


def global_batches_per_epoch(have: int, per_rank: int, world_size: int, what: str,
                             unit: str = "images") -> int:
    """How many whole global batches (`per_rank` x `world_size`) one epoch of `have` items holds;
    a DataError naming `what` (the field the items come from) when not even one fits."""
    need = per_rank * world_size
    if have < need:
        raise DataError(f"{what}: {have} {unit}, fewer than one global batch of {need} "
                        f"({per_rank} x {world_size} ranks)")
    return have // need
