"""Resident data (`data.source=resident`): a small labelled set decoded once and held in memory.

For sets that fit on the device (Tiny ImageNet: 50,500 images are 155 MB at 32 px, 620 MB at
64 px), decoding JPEGs every step is what limits a GPU run, not the model. Here the shards are
decoded once (resize shorter side + centre crop to `data.resident_decode_size`, the evaluation
rule of transforms.py) into a uint8 array (N, 3, S, S) that is cached on the host, then copied to
the training device; each batch is gathered, cropped and flipped there in one `grid_sample` call
(`transforms.random_resized_crop_batch`). On the CPU the same code runs on the array in RAM.

Cache: `<cache_dir>/resident-<key>.npy` (images), `-labels.npy`, and a JSON sidecar written last
(its presence marks a complete cache). The key hashes the shard list with each shard's size and
modification time and the decode size, so a changed shard or size decodes again. Arrays are
read with `allow_pickle=False`: a cache file cannot run code.

Order and resume: epoch e visits a permutation of the N images keyed on (seed, e); global batch
b of the epoch takes positions [b*B, (b+1)*B) of it (the tail that does not fill a global batch is
dropped), rank r the global batches b*world + r. Crop boxes and flips of a batch come from a
generator keyed on (seed, epoch, global batch). So the position is (epoch, batch index) and a
resumed stream is bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from .badsamples import BadSampleCounter, DataError
from .placement import Placement
from .shuffle import global_batches_per_epoch
from .transforms import (
    eval_transform,
    generator_for,
    normalize,
    random_resized_crop_batch,
    single_thread,
)

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("ldae_fast.data")

CACHE_VERSION = 1
# Domain tags for `generator_for`, distinct from those of sources.py.
_TAG_RES_PERM = 23
_TAG_RES_AUG = 24

# Host arrays already loaded in this process, by cache key: the tokenizer fit and the trainer
# both open the stream, and the second should not read the file again.
_LOADED: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ldae-fast" / "resident"


def cache_key(urls: list[str], size: int) -> tuple[str, dict[str, Any]]:
    """(hex key, the description it hashes) of a shard list decoded at `size`."""
    from .urls import is_local, local_path

    shards = []
    for u in urls:
        if not is_local(u):
            raise DataError(f"data.source='resident' reads local shard files; {u!r} is not one "
                            "(copy the shards to disk, or use data.source='wds')")
        st = os.stat(local_path(u))
        shards.append([os.path.abspath(local_path(u)), st.st_size, st.st_mtime_ns])
    desc = {"version": CACHE_VERSION, "size": size, "shards": shards}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20], desc


def decode_shards(urls: list[str], size: int, max_bad_fraction: float, what: str,
                  threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every readable sample of `urls`, in shard and tar order: uint8 (N,3,S,S), int64 (N,)."""
    from .tar import iter_shard

    counter = BadSampleCounter(max_bad_fraction, what)
    imgs: list[torch.Tensor] = []
    labels: list[int] = []

    def decode(raw: Any) -> torch.Tensor | Exception:
        try:
            return eval_transform(raw.data, size)
        except Exception as e:  # untrusted bytes: any decoder failure means a bad sample
            return e

    # PIL releases the GIL while it decodes: threads decode in parallel, the order is kept.
    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        for url in urls:
            raws = list(iter_shard(url, counter))
            for raw, img in zip(raws, pool.map(decode, raws)):
                if isinstance(img, Exception):
                    counter.record(raw.shard, raw.key, f"cannot decode image: {type(img).__name__}: "
                                   f"{str(img)[:160]}")
                    continue
                counter.ok()
                imgs.append(img)
                labels.append(raw.label)
    if not imgs:
        raise DataError(f"{what}: no readable sample in {len(urls)} shard(s)")
    return torch.stack(imgs).numpy(), np.asarray(labels, dtype=np.int64)


def load_resident(urls: list[str], size: int, cache_dir: str | Path = "", max_bad_fraction: float = 0.01,
                  what: str = "data.train_shards", log_fn: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Host uint8 images (N,3,S,S) and int64 labels of `urls`, decoded once and cached."""
    key, desc = cache_key(urls, size)
    if key in _LOADED:
        return _LOADED[key]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    img_path, lab_path, meta_path = (root / f"resident-{key}{s}" for s in (".npy", "-labels.npy", ".json"))
    say = log_fn or log.info
    arrays = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == desc:
                arrays = (np.load(img_path, allow_pickle=False), np.load(lab_path, allow_pickle=False))
                if arrays[0].shape[0] != arrays[1].shape[0] or arrays[0].shape[1:] != (3, size, size):
                    arrays = None
        except (OSError, ValueError):
            arrays = None  # a damaged cache is decoded again, not trusted
        if arrays is None:
            say(f"resident cache {meta_path} does not match its arrays: decoding again")
    if arrays is None:
        t0 = time.time()
        arrays = decode_shards(urls, size, max_bad_fraction, what)
        say(f"decoded {len(arrays[1])} images of {len(urls)} shard(s) at {size}px in {time.time() - t0:.1f}s; "
            f"cached in {root}")
        try:
            root.mkdir(parents=True, exist_ok=True)
            # Written under temporary names, the sidecar last: a killed run leaves no cache
            # that looks complete.
            for path, arr in ((img_path, arrays[0]), (lab_path, arrays[1])):
                tmp = path.with_name(path.name + f".tmp{os.getpid()}")
                with open(tmp, "wb") as f:
                    np.save(f, arr, allow_pickle=False)
                os.replace(tmp, path)
            tmp = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"key": desc, "images": int(len(arrays[1]))}, indent=1) + "\n")
            os.replace(tmp, meta_path)
        except OSError as e:
            say(f"could not write the resident cache in {root} ({e}); the next run decodes again")
    out = (torch.from_numpy(np.ascontiguousarray(arrays[0])), torch.from_numpy(np.ascontiguousarray(arrays[1])))
    _LOADED[key] = out
    return out


def decode_size_of(cfg: Config) -> int:
    return cfg.data.resident_decode_size or cfg.data.img_size


def keep_classes(images: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the samples of classes 0..k-1 (k = 0: all)."""
    if k <= 0:
        return images, labels
    sel = (labels < k).nonzero().flatten()
    return images[sel], labels[sel]


def resident_arrays(cfg: Config, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels of data.train_shards ('train') or data.val_shards ('val'), decoded
    at `resident_decode_size`, cached, with data.class_subset applied. The train arrays at
    decode size = img_size are exactly what `build_eval_arrays` gives, before normalisation."""
    from .urls import expand_urls

    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: choose 'train' or 'val'")
    d = cfg.data
    what = "data.train_shards" if split == "train" else "data.val_shards"
    urls = expand_urls(d.train_shards if split == "train" else d.val_shards, what)
    imgs, labels = load_resident(urls, decode_size_of(cfg), d.cache_dir, d.max_bad_fraction, what)
    imgs, labels = keep_classes(imgs, labels, d.class_subset)
    if len(labels) == 0:
        raise DataError(f"{what}: no sample of classes 0..{d.class_subset - 1} (data.class_subset)")
    return imgs, labels


class ResidentStream:
    """Endless (images float32 (B,3,S,S) normalised, labels int64 (B,)) batches of one rank, from
    the resident array; the same interface as `stream.TrainStream` (iteration, `state_dict`,
    `load_state_dict`, `stats`, `epoch`, `close`). Batches are made on `device` (the CPU when
    None); see the module docstring for order and resume."""

    source = "resident"

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1,
                 device: torch.device | str | None = None) -> None:
        d = cfg.data
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.batch_size = d.batch_size
        self.seed = cfg.engine.seed
        self.scale = (d.crop_min_scale, 1.0)
        self.hflip = d.hflip
        self.img_size = d.img_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        host_imgs, host_labels = resident_arrays(cfg, "train")
        self.batches_per_epoch = global_batches_per_epoch(
            len(host_labels), d.batch_size, world_size, "data.train_shards", "usable images")
        self.images = host_imgs.to(self.device)
        self.labels = host_labels.to(self.device)
        self.num_images = len(host_labels)
        self.placement = Placement(self.num_images, d.batch_size, world_size, rank)
        self.batches = 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)
        if d.epoch_size != self.num_images:
            log.info("data.epoch_size=%d (the schedule's epoch) but the resident set holds %d images "
                     "(the stream's epoch)", d.epoch_size, self.num_images)

    @property
    def epoch(self) -> int:
        return self.placement.epoch(self.batches)

    def stats(self) -> dict[str, int]:
        return {"good": self.num_images, "bad": 0}

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source, "batches": self.batches, **self.placement.state_dict(self.batches),
                "batches_per_epoch": self.batches_per_epoch, "seed": self.seed, "num_images": self.num_images}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("source") != self.source:
            raise DataError(f"data position was saved for source {sd.get('source')!r}, "
                            f"this run reads {self.source!r}")
        if int(sd.get("num_images", self.num_images)) != self.num_images:
            raise DataError(f"data position was saved for {sd.get('num_images')} resident images; this "
                            f"run has {self.num_images}: the epoch permutation would differ")
        # Another rank count or micro-batch: the rest of the interrupted epoch is re-split.
        self.batches = self.placement.load_state_dict(sd)[0]

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of epoch `epoch` (CPU int64), the same on every rank."""
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.num_images, generator=generator_for(self.seed, _TAG_RES_PERM, epoch))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch j (0, 1, ... across epochs) of this rank: uint8 crops and labels on the device."""
        epoch, first = self.placement.locate(j)
        idx = self.permutation(epoch)[first:first + self.batch_size]
        gen = generator_for(self.seed, _TAG_RES_AUG, epoch, first // self.batch_size)
        idx = idx.to(self.device)
        out = random_resized_crop_batch(self.images[idx], self.img_size, self.scale, self.hflip, gen)
        return out, self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu":
            # Batch-sized ops: intra-op threads only cost on a shared CPU (transforms.single_thread).
            with single_thread():
                imgs, labels = self.batch(self.batches)
                imgs = normalize(imgs)
        else:
            imgs, labels = self.batch(self.batches)
            imgs = normalize(imgs)
        self.batches += 1
        return imgs, labels

    def close(self) -> None:
        pass
