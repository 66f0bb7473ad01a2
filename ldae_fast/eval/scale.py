"""The streaming protocols of `ldae-fast eval` on shards: linear-fast, knn and linear, each
data-parallel under torchrun, with the raw-pixel floor beside the random-init one.

- linear-fast and knn read a feature store (eval/feature_store.py) of un-augmented train / val
  features: one pass per encoder writes it, a rerun with the same weights and settings reuses it.
  linear-fast trains one head per base lr (eval/fast_heads.py) and picks the lr on a held-out part
  of train; knn shards its bank over the ranks (eval/knn_sharded.py), on raw, centred and
  whitened rows (eval/rows.py), each row named.
- linear is the full MAE protocol over the augmented stream (eval/probe_stream.py), resumable.
- The 'pixels' encoder: the eval view of the image, average-pooled to at most 32 x 32 (3 x 32 x 32
  = 3072 numbers at ImageNet size), and its PCA at the checkpoint's feature width: the floor any
  learned feature must beat under the same protocol.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldae_fast.data.transforms import normalize

from ..device import autocast_dtype, autocast_for, eval_mode
from . import dist as edist
from .fast_heads import DEFAULT_BLRS, train_heads
from .feature_store import FeatureStore, weights_hash, write_stores
from .features import Log, feature_dim, pool_features
from .knn_sharded import knn_sharded
from .linear_probe import FAST_PROTOCOL
from .probe_stream import ProbeSettings, run_probe
from .rows import fit_rows
from .shared_dir import check_shared
from .split_info import classes_beside, on_rank0, scan_labels
from .stream import EvalStream, SplitSpec, split_spec

PIXEL_SIDE = 32


class PixelView(nn.Module):
    """Raw pixels as features: the normalised eval image average-pooled to `side` x `side`."""

    def __init__(self, img_size: int, side: int = PIXEL_SIDE) -> None:
        super().__init__()
        self.side = min(side, img_size)
        self.num_features = 3 * self.side * self.side

    def pooled(self, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        if x.shape[-1] != self.side:
            x = F.adaptive_avg_pool2d(x.float(), self.side)
        return x.flatten(1).float()


@dataclass
class ScaleArgs:
    readers: int = 16
    num_workers: int = 0
    micro_batch: int = 256
    store_root: Optional[Path] = None
    store_dtype: str = "fp16"
    blrs: tuple[float, ...] = DEFAULT_BLRS
    holdout: float = 0.1
    knn_rows: tuple[str, ...] = ("raw", "centred", "whitened")
    probe_dir: Optional[Path] = None
    ckpt_every: int = 100


class StreamingEval:
    """Runs the streaming protocols for a set of encoders; caches one store per encoder."""

    def __init__(self, cfg, views: dict[str, nn.Module], probe_key: dict, sa: ScaleArgs, *, pool: str,
                 seed: int, device: torch.device, max_train: Optional[int], max_val: Optional[int],
                 log: Log) -> None:
        self.cfg, self.views, self.sa, self.pool, self.seed = cfg, views, sa, pool, seed
        self.device, self.log = device, log
        self.ranks = edist.current()
        self.probe_key = probe_key
        self.train_flat = split_spec(cfg, "train", augment=False, readers=sa.readers, seed=seed,
                                     max_images=max_train, shuffle_buffer=0)
        self.val = split_spec(cfg, "val", augment=False, readers=sa.readers, seed=seed, max_images=max_val)
        self.train_aug = split_spec(cfg, "train", augment=True, readers=sa.readers, seed=seed,
                                    max_images=max_train)
        self.max_train, self.max_val = max_train, max_val
        self.stores: dict[str, FeatureStore] = {}
        self.extract_seconds: dict[str, float] = {}
        self._classes: Optional[int] = None
        self._spectra: dict[str, dict] = {}
        self.counts = {"train": 0, "val": 0}
        self._hashes: dict[tuple, str] = {}
        self._scans: dict[str, tuple[int, int]] = {}
        self._root_checked = False

    # The feature store ----------------------------------------------------------------------
    def _store_root(self) -> Path:
        """The stores' root, proven visible to every rank once (each rank reads the others' parts)."""
        root = self.sa.store_root or Path("runs") / "features"
        if not self._root_checked:
            check_shared(root, "--feature-store")
            self._root_checked = True
        return root

    def _store_settings(self, view: nn.Module, probe_key: dict) -> dict:
        """What changes a stored row. Not the reader count, which follows the rank count by
        default: the readers split the same images (ids) whatever their number, and each clean
        row is a function of its image alone, so a rerun on another node count reuses the store.
        A noisy probe view draws its noise per position in a forward's batch, which the readers
        decide: there the count is part of the key."""
        noisy = probe_key.get("input") == "noisy"
        return dict(encoder=self._weights_hash(view), kind=type(view).__name__, probe=probe_key, pool=self.pool,
                    img_size=self.cfg.data.img_size, train=list(self.train_flat.urls),
                    val=list(self.val.urls), max_train=self.max_train, max_val=self.max_val,
                    **(dict(readers=self.sa.readers) if noisy else {}),
                    transform="resize + centre crop", compute=self._compute())

    def _compute(self) -> dict:
        """How `_features` computes, which moves the features as much as a weight does: bf16
        autocast on a GPU and fp32 on the CPU give rows a point or two of probe accuracy apart."""
        dtype = autocast_dtype("auto", self.device)
        return dict(device=self.device.type, autocast=str(dtype).removeprefix("torch.") if dtype else "fp32")

    def store(self, name: str) -> FeatureStore:
        if name in self.stores:
            return self.stores[name]
        view = self.views[name]
        root = self._store_root()
        st = FeatureStore(root, self._store_settings(view, self.probe_key), self.sa.store_dtype)
        t0 = time.perf_counter()
        # Rank 0 decides for all: ranks that disagreed would wait in different collectives.
        if edist.all_gather_objects(st.complete())[0]:
            if self.log and self.ranks.main:
                self.log(f"{name}: reusing the feature store {st.dir}")
        else:
            if self.log and self.ranks.main:
                self.log(f"{name}: writing the feature store {st.dir}")
            n_train = self._known_train()  # the ETA only: no scan for it
            st.write({"train": lambda: self._features(view, self.train_flat, f"{name} train", n_train),
                      "val": lambda: self._features(view, self.val, f"{name} val", self.max_val or 0)})
        self.extract_seconds[name] = time.perf_counter() - t0
        self.stores[name] = st
        tr, va = st.read("train"), st.read("val")
        self.counts = {"train": len(tr), "val": len(va)}
        self.log_store(name, st)
        return st

    def _weights_hash(self, view: nn.Module) -> str:
        """weights_hash, once per set of tensors: the views of one sweep share their encoder, and
        the weights stay frozen for the whole evaluation."""
        sd = view.state_dict()
        ident = tuple((n, t.data_ptr(), tuple(t.shape), str(t.dtype)) for n, t in sd.items())
        if ident not in self._hashes:
            self._hashes[ident] = weights_hash(view)
        return self._hashes[ident]

    def sweep_stores(self, name: str, passes) -> dict[tuple[int, int], FeatureStore]:
        """The (k, t) stores of a probe sweep (eval/sweep.py) of encoder `name`: the missing ones
        written from one pass over the images, one forward per image and t."""
        from .sweep import read_pass

        root = self._store_root()
        stores = {(en.k, en.t): FeatureStore(root, self._store_settings(en.view, en.probe_key), self.sa.store_dtype)
                  for p in passes for en in p.entries}
        t0 = time.perf_counter()
        # Rank 0 decides for all (see `store`).
        done = edist.all_gather_objects({kt: st.complete() for kt, st in stores.items()})[0]
        todo = [(p, [en for en in p.entries if not done[(en.k, en.t)]]) for p in passes]
        todo = [(p, ens) for p, ens in todo if ens]
        if self.log and self.ranks.main:
            n_new = sum(len(ens) for _, ens in todo)
            self.log(f"{name}: probe sweep of {len(stores)} (k, t) stores: reusing {len(stores) - n_new}, "
                     + (f"writing {n_new} from one pass over the images, {len(todo)} forward(s) per image"
                        if n_new else "nothing to write"))
        if todo:
            order = [stores[(en.k, en.t)] for _, ens in todo for en in ens]
            n_train = self._known_train()  # the ETA only: no scan for it

            views = [p.view for p, _ in todo]

            def read(xb):
                return [f.float() for p, ens in todo for f in read_pass(p, xb, self.pool, ens)]

            def chunks(spec, desc, total):
                return lambda: self._features(views, spec, desc, total, read=read)
            write_stores(order, {"train": chunks(self.train_flat, f"{name} sweep train", n_train),
                                 "val": chunks(self.val, f"{name} sweep val", self.max_val or 0)})
        self.extract_seconds[f"{name} sweep"] = time.perf_counter() - t0
        return stores

    def linear_fast_sweep(self, name: str, passes, epochs: int, batch_size: int) -> list[dict]:
        """Heads for every (k, t, lr) of a sweep in one pass over its stores, the (k, t) entries
        shared out over the ranks (each entry's heads train as they would alone); one record per
        (k, t)."""
        from .fast_heads import train_heads_many

        stores = self.sweep_stores(name, passes)
        entries = [en for p in passes for en in p.entries]
        C = self.num_classes(stores[(entries[0].k, entries[0].t)])

        def fit(mine):
            rows = [(stores[(en.k, en.t)].read("train"), stores[(en.k, en.t)].read("val")) for en in mine]
            return train_heads_many(rows, num_classes=C, blrs=self.sa.blrs, epochs=epochs, batch_size=batch_size,
                                    holdout=self.sa.holdout, seed=self.seed, device=self.device, log=self.log,
                                    descs=[f"linear-fast/{name} k={en.k} t={en.t}" for en in mine])
        results = edist.spread(entries, fit)
        tr, va = stores[(entries[0].k, entries[0].t)].read("train"), stores[(entries[0].k, entries[0].t)].read("val")
        self.counts = {"train": len(tr), "val": len(va)}
        total = self.extract_seconds[f"{name} sweep"] + max((r["seconds"] for r in results), default=0.0)
        return [dict(res, k=en.k, t=en.t, sigma=en.sigma, input=en.input, encoder=name, seconds=total,
                     forwards_per_image=len(passes))
                for en, res in zip(entries, results)]

    def log_store(self, name, st) -> None:
        if self.log and self.ranks.main:
            self.log(f"{name}: {self.counts['train']} train / {self.counts['val']} val rows "
                     f"({self.extract_seconds[name]:.1f}s)")

    def _features(self, view: nn.Module | list[nn.Module], spec: SplitSpec, desc: str, total: int = 0, read=None):
        """(features, labels, ids) chunks of this rank's share; progress lines with images/s and,
        when the split's size is known (`total`, all ranks), the ETA. `read` (images -> whatever
        the caller stores, reading the modules `view`) replaces pooling `view`'s features."""
        read = read or (lambda xb: pool_features(view, xb, self.pool).float())
        s = EvalStream(spec, self.ranks.rank, self.ranks.world_size, self.sa.num_workers)
        t0 = last = time.perf_counter()
        n = 0
        with ExitStack() as modes:
            for v in view if isinstance(view, list) else [view]:
                modes.enter_context(eval_mode(v))
            for x, y, ids in s.once(chunk=self.sa.micro_batch):
                xb = normalize(x.to(self.device, non_blocking=True))
                with torch.no_grad(), autocast_for(self.device):
                    f = read(xb)
                n += x.shape[0]
                now = time.perf_counter()
                if self.log and self.ranks.main and now - last > 10:
                    rate = n / (now - t0)
                    eta = ""
                    if total:
                        left = max(0.0, total / self.ranks.world_size - n) / max(rate, 1e-9)
                        eta = f", ETA {left / 60:.1f} min"
                    self.log(f"{desc}: {n} images on rank 0, {rate:.0f} img/s per rank{eta}")
                    last = now
                yield f, y, ids

    def num_classes(self, store: Optional[FeatureStore] = None) -> int:
        """data.num_classes, else the classes.tsv beside the train shards (make-shards writes it),
        else 1 + the largest label of `store` or of a store already read, else of a scan of the
        shards' labels on rank 0 (eval/split_info.py)."""
        if self._classes is None:
            d = self.cfg.data
            if d.num_classes > 0:
                self._classes = d.num_classes
            elif (beside := classes_beside(self.train_flat.urls)) > 0:
                self._classes = beside
            elif store is not None or self.stores:
                st = store or next(iter(self.stores.values()))
                labs = [st.read(s).labels for s in ("train", "val")]
                self._classes = int(max(int(v.max()) for v in labs if v.size) + 1)
            else:
                self._classes = max(self._scan("train")[1], self._scan("val")[1])
        return self._classes

    def _scan(self, split: str) -> tuple[int, int]:
        """split_info.scan_labels of one split, on rank 0, once."""
        if split not in self._scans:
            spec = self.train_flat if split == "train" else self.val
            self._scans[split] = on_rank0(lambda: scan_labels(spec))
        return self._scans[split]

    def num_train(self) -> int:
        """The probe's and the fine-tune's epoch: --max-train-images, else data.epoch_size where it
        describes the eval data (the checkpoint's own shards, a preset's), else the train shards'
        sample count (a header scan on rank 0)."""
        return self._known_train() or self._scan("train")[0]

    def _known_train(self) -> int:
        d = self.cfg.data
        return self.max_train or (d.epoch_size if d.epoch_size > 1 else 0)

    # Protocols --------------------------------------------------------------------------------
    def linear_fast(self, name: str, epochs: int, batch_size: int) -> list[tuple[str, str, dict]]:
        st = self.store(name)
        C = self.num_classes()
        out = []
        variants = [("", None)]
        if name == "pixels":
            variants.append(("pca", self._checkpoint_width()))
        for kind, width in variants:
            # The row map from every rank's part (a collective), before the ranks train the heads,
            # each its share of the lrs (the same answer as one rank training them all).
            rmap = self._rmap(name, "pca", width) if kind else None
            res = train_heads(st.read("train"), st.read("val"), num_classes=C, blrs=self.sa.blrs, epochs=epochs,
                              batch_size=batch_size, holdout=self.sa.holdout, seed=self.seed, rmap=rmap,
                              device=self.device, log=self.log, desc=f"linear-fast/{name}", share=True)
            res["seconds"] += self.extract_seconds.get(name, 0.0)
            enc = name if not kind else f"{name} (PCA {width})"
            if kind:
                res["feature_dim"] = width
            out.append((FAST_PROTOCOL, enc, res))
        return out

    def _rmap(self, name: str, kind: str, width: int):
        bank = self.store(name).read("train", self.ranks.rank, self.ranks.world_size)
        return fit_rows(bank, kind, width, cache=self._spectra.setdefault(name, {}))

    def _checkpoint_width(self) -> int:
        for n, v in self.views.items():
            if n != "pixels":
                return feature_dim(v)
        return 64

    def knn(self, name: str, ks: list[int]) -> list[tuple[str, str, dict]]:
        st = self.store(name)
        C = self.num_classes()
        bank = st.read("train", self.ranks.rank, self.ranks.world_size)
        queries = st.read("val")
        kinds = list(self.sa.knn_rows)
        if name == "pixels":
            kinds.append("pca")
        rows = []
        for kind in kinds:
            t0 = time.perf_counter()
            width = self._checkpoint_width()
            rmap = self._rmap(name, kind, width)
            res = knn_sharded(bank, queries, rmap, num_classes=C, ks=ks, device=self.device, log=self.log)
            dt = time.perf_counter() - t0 + self.extract_seconds.get(name, 0.0)
            for k, r in res.items():
                label = f"knn k={r['k_used']}" + ("" if r["k_used"] == k else f" (asked {k})")
                # Raw rows are the usual protocol (DINO's) and keep its plain name.
                label += "" if rmap.kind == "raw" else f", {rmap.kind} rows"
                fd = width if kind == "pca" else bank.dim
                rows.append((label, name, dict(r, epochs=None, seconds=dt, feature_dim=fd, T=0.07)))
        return rows

    def linear(self, name: str, epochs: int, batch_size: int, blr: float) -> list[tuple[str, str, dict]]:
        view = self.views[name]
        C = self.num_classes()
        n_train = self.num_train()
        G = batch_size
        micro = min(self.sa.micro_batch, max(1, G // self.ranks.world_size))
        s = ProbeSettings(epochs=epochs, global_batch=G, micro_batch=micro, blr=blr, num_train=n_train,
                          num_classes=C, seed=self.seed, pool=self.pool)
        key = f"{weights_hash(view)}:{sorted(self.probe_key.items())}"
        if self.probe_key.get("input") == "noisy":
            key += f":micro={micro}"  # its noise is drawn per position in a forward's batch
        res = run_probe(view, self.train_aug, self.val, s, ckpt_dir=self.sa.probe_dir,
                        ckpt_every=self.sa.ckpt_every, encoder_key=key, num_workers=self.sa.num_workers,
                        log=self.log, desc=f"linear/{name}")
        res.pop("state", None)
        self.counts["train"] = self.counts["train"] or n_train
        self.counts["val"] = self.counts["val"] or res["val_images"]
        return [(res["protocol"], name, res)]


__all__ = ["StreamingEval", "ScaleArgs", "PixelView", "PIXEL_SIDE"]
