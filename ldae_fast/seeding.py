"""One seed derivation for every random draw of a run: data order, augmentation, noise, masks.

Each draw is keyed on its position (seed, domain tag, epoch / step, sample or batch row, ...),
never on a running generator, so any step can be regenerated exactly on resume and N ranks draw
what one process draws. Domain tags keep streams apart: 11-29 belong to the data pipeline
(data/shuffle.py, data/sources.py 12-22, data/resident.py 23-24), 31-49 to the methods (below),
101 and up to the built-in synthetic image kinds (data/synthetic.py).
"""

from __future__ import annotations

_M64 = (1 << 64) - 1

TAG_NOISE_LEVEL = 31
"""Per-sample t of a training step."""
TAG_NOISE = 32
"""The noise eps of a training step (the kernels' seed; rows by counter offset)."""
TAG_MASK = 33
"""Per-sample patch masks (DiffMAE)."""
TAG_SAMPLE = 34
"""Draws of a sampler (DiffMAE's inpainting: the starting noise and each step's noise)."""
TAG_LABEL_DROP = 35
"""Which training labels are dropped to the null class (ldae.class_cond)."""


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers: a splitmix64 finaliser folded over the
    keys, so (1, 2) and (2, 1) differ and a prefix of the keys is a different stream."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & _M64)) & _M64
        h = (h * 0xBF58476D1CE4E5B9) & _M64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _M64
        h ^= h >> 29
    return h >> 1


def global_rows(batch: int, micro: int, accum: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first row, size) of a micro-batch's place in its step's global batch: micro-batch m of
    `accum` on rank r holds rows (m * world + r) * batch .. + batch - 1 of batch * world * accum,
    so N ranks x A micro-batches of B key their draws as one process with batch N*A*B does."""
    if not 0 <= micro < accum:
        raise ValueError(f"micro={micro} must lie in [0, accum={accum})")
    return batch * (micro * world_size + rank), batch * world_size * accum
