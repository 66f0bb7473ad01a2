"""The feature store: pooled features of a split, written once to disk, memory-mapped on reuse.

Layout of one store, `<root>/<key>/`:
    manifest.json                 the settings (everything that changes a feature), per-part row
                                  counts, the dtype, and `complete` (written last)
    <split>-part<rank>.feat       raw rows (n, F) in fp16 or bf16 (bf16 kept as its 16 bits)
    <split>-part<rank>.label      int64 (n,)
    <split>-part<rank>.id         int64 (n, 2): (shard index, ordinal in the shard)

`key` is a hash of the manifest's settings: the encoder's weights (a hash of its tensors, so a
checkpoint and any copy of it agree), the probe view (t, sigma, input, depth k), pooling, image
size, the shard list and image cap, the device type and autocast of the extraction, the dtype. Any change gives another key, so a stale store is
never read; a store without `complete` (a killed pass) is written again. Each rank writes its own
part; a store written by N ranks is read by any number of them (parts go round-robin). A probe
sweep writes one store per (k, t) from one pass over the images (`write_stores`), under the key
a single probe at that (k, t) gives, so either reuses the other's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import dist as edist

DTYPES = {"fp16": (torch.float16, np.float16), "bf16": (torch.bfloat16, np.uint16)}


def weights_hash(module: nn.Module) -> str:
    """sha256 over the module's tensors (names, shapes, dtypes, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def store_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class SplitRows:
    """The rows of one split (all parts, memory-mapped): features as float32 on access."""

    feats: list[np.ndarray]
    labels: np.ndarray
    ids: np.ndarray
    dtype: str
    width: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        return int(self.feats[0].shape[1]) if self.feats else self.width

    def _as_float(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.dtype == "bf16":
            return t.view(torch.bfloat16).float()
        return t.float()

    def rows(self, idx: np.ndarray) -> torch.Tensor:
        """Rows `idx` (global order: parts concatenated) as float32."""
        if not self.feats:
            return torch.zeros(len(idx), self.dim)
        offs = np.cumsum([0] + [f.shape[0] for f in self.feats])
        out = np.empty((len(idx), self.dim), dtype=self.feats[0].dtype)
        part = np.searchsorted(offs, idx, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.feats[p][idx[sel] - offs[p]]
        return self._as_float(out)

    def all(self) -> torch.Tensor:
        return self._as_float(np.concatenate(self.feats)) if self.feats else torch.zeros(0, 0)


class FeatureStore:
    """One store directory; see the module docstring."""

    def __init__(self, root: str | os.PathLike, settings: dict, dtype: str = "fp16") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"feature store dtype {dtype!r}: choose {', '.join(DTYPES)}")
        self.settings = dict(settings, dtype=dtype)
        self.key = store_key(self.settings)
        self.dir = Path(root) / self.key
        self.dtype = dtype

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def manifest(self) -> Optional[dict]:
        try:
            m = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None
        return m if m.get("complete") and m.get("settings") == self.settings else None

    def complete(self) -> bool:
        return self.manifest() is not None

    def write(self, split_chunks: dict[str, Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]],
              ) -> None:
        """Run every split's (features, labels, ids) chunks of this rank into its part files;
        rank 0 writes the manifest once all ranks are done."""
        def one(chunks):
            return lambda: (([f], y, ids) for f, y, ids in chunks())
        write_stores([self], {split: one(chunks) for split, chunks in split_chunks.items()})

    def read(self, split: str, rank: int = 0, world_size: int = 1) -> SplitRows:
        """The parts of `split` that rank `rank` of `world_size` reads (all parts: 0 of 1)."""
        m = self.manifest()
        if m is None:
            raise FileNotFoundError(f"feature store {self.dir} is not complete")
        _, ndt = DTYPES[self.dtype]
        dim = int(m["dim"])
        feats, labels, ids = [], [], []
        for p in range(rank, len(m["parts"]), world_size):
            n = int(m["parts"][p].get(split, 0))
            if n == 0:
                continue
            base = self.dir / f"{split}-part{p:05d}"
            feats.append(np.memmap(f"{base}.feat", dtype=ndt, mode="r", shape=(n, dim)))
            labels.append(np.fromfile(f"{base}.label", dtype=np.int64))
            ids.append(np.fromfile(f"{base}.id", dtype=np.int64).reshape(-1, 2))
        lab = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        idv = np.concatenate(ids) if ids else np.zeros((0, 2), np.int64)
        return SplitRows(feats, lab, idv, self.dtype, dim)


def write_stores(stores: Sequence[FeatureStore],
                 split_chunks: dict[str, Callable[[], Iterator[tuple[Sequence[torch.Tensor], torch.Tensor, torch.Tensor]]]],
                 ) -> None:
    """Several stores from one pass: every chunk carries one feature block per store (in the
    order of `stores`) for the same images, so the rows of all stores line up. This rank writes
    its part of each; rank 0 writes each manifest once all ranks are done."""
    r = edist.current()
    if r.main:
        for st in stores:
            if st.dir.exists():
                shutil.rmtree(st.dir)
            st.dir.mkdir(parents=True)
    edist.barrier()
    counts: dict[str, int] = {}
    dims = [0] * len(stores)
    for split, chunks in split_chunks.items():
        n = 0
        with ExitStack() as files:
            out = [tuple(files.enter_context(open(f"{st.dir / f'{split}-part{r.rank:05d}'}.{ext}", "wb"))
                         for ext in ("feat", "label", "id")) for st in stores]
            for feats, y, ids in chunks():
                if len(feats) != len(stores):
                    raise ValueError(f"a chunk of {len(feats)} feature blocks for {len(stores)} stores")
                y_bytes = y.to(torch.int64).numpy().tobytes()
                id_bytes = ids.to(torch.int64).numpy().tobytes()
                for j, (st, f, (ff, fl, fi)) in enumerate(zip(stores, feats, out)):
                    dims[j] = int(f.shape[1])
                    ff.write(f.detach().to("cpu", DTYPES[st.dtype][0]).contiguous().view(torch.int16).numpy().tobytes())
                    fl.write(y_bytes)
                    fi.write(id_bytes)
                n += int(y.shape[0])
        counts[split] = n
    all_dims = edist.all_gather_objects(dims)
    parts = edist.all_gather_objects(counts)
    if r.main:
        for j, st in enumerate(stores):
            m = dict(settings=st.settings, dim=max(d[j] for d in all_dims), parts=parts, complete=True)
            tmp = st.manifest_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(m, indent=1))
            os.replace(tmp, st.manifest_path)
    edist.barrier()


__all__ = ["FeatureStore", "write_stores", "SplitRows", "weights_hash", "store_key", "DTYPES"]
