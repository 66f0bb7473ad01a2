"""The training stream the trainer iterates, and its resume rule.

Resume rule (`TrainStream.state_dict`): the position is the number of batches handed out, plus,
for 'wds', each worker's (epoch, samples out of the shuffle buffer in that epoch) after the last
of its batches that was handed out (the reading order is sources.py's).
- resampled=False: exact. Each worker re-derives its epoch's shard order and shuffle-buffer
  seed, replays the epoch up to its saved sample count reading tar members only (no JPEG
  decode), and continues; batches are re-assigned to workers in the same round-robin order, so
  the resumed stream is bit-identical to the uninterrupted one. The replay costs reading at most
  one epoch of that worker's shards; it needs the same world size and num_workers (otherwise
  the stream warns and restarts from the start of the earliest epoch in progress).
- resampled=True: not replayed. The stream is re-seeded from (seed, batches handed out), so a
  resume is deterministic for a given step but draws different samples than the uninterrupted
  run would have; both are i.i.d. draws with replacement, so nothing is lost statistically.
For 'synthetic' the position is (epoch, batch index) and resume is exact (see synthetic.py).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from .badsamples import DataError
from .sources import SyntheticTrainSource, WdsTrainSource
from .synthetic import synthetic_split
from .tar import LabelPolicy
from .transforms import CropBox, crop_resize_flip, decode_jpegs, gpu_decode_available, normalize
from .urls import expand_urls

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("ldae_fast.data")


# The training stream -------------------------------------------------------------------------
class TrainStream:
    """Endless (images float32 (B,3,H,W) normalised, labels int64 (B,)) batches of one rank.

    Iterate it (`for x, y in stream`, or `next(stream)`); it crosses epochs itself. The position
    counts batches handed out; `state_dict()` taken between steps (no batch held back) and given
    to `load_state_dict` of a fresh stream continues the run as the module docstring describes.
    With `device` set, batches arrive there (uint8 sent, normalised on the device); otherwise
    they are normalised on the CPU in the workers. One live iterator at a time: a new
    `iter(stream)` starts from the current position and retires the previous iterator.
    """

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1,
                 device: torch.device | str | None = None) -> None:
        d = cfg.data
        self.cfg = cfg
        self.source = d.source
        self.rank, self.world_size = rank, world_size
        self.batch_size = d.batch_size
        self.seed = cfg.engine.seed
        self.num_workers = d.num_workers
        self.num_roles = max(1, d.num_workers)
        self.gpu = False
        if d.gpu_decode and d.source == "wds":
            if gpu_decode_available():
                self.gpu = True
                if device is None:
                    device = torch.device("cuda", torch.cuda.current_device())
            else:
                warnings.warn("data.gpu_decode=true but CUDA or torchvision.io.decode_jpeg is not "
                              "available: decoding JPEGs with PIL on the CPU workers instead", stacklevel=3)
        self.device = torch.device(device) if device is not None else None
        self.batches = 0  # handed out since the start of the run
        self.good = self.bad = 0
        self._worker_counts: dict[int, tuple[int, int]] = {}
        self._it_id = 0
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        if self.source == "synthetic":
            self._images, self._labels = synthetic_split(
                "train", d.synthetic_images, d.synthetic_classes, d.img_size)
            need = d.batch_size * world_size
            if len(self._images) < need:
                raise DataError(f"data.synthetic_images={d.synthetic_images} is smaller than one global "
                                f"batch ({d.batch_size} x {world_size} ranks = {need})")
            self.batches_per_epoch = len(self._images) // need
        else:
            self.urls = expand_urls(d.train_shards, "data.train_shards")
            slots = world_size * self.num_roles
            if not d.resampled and len(self.urls) < slots:
                raise DataError(
                    f"data.train_shards={d.train_shards!r} has {len(self.urls)} shard(s), fewer than "
                    f"{world_size} rank(s) x {self.num_roles} worker(s) = {slots} readers: some would "
                    f"get no data. Write more, smaller shards (`ldae-fast make-shards --maxcount`), "
                    f"lower data.num_workers, or set data.resampled=true")
            self._starts = [(0, 0)] * self.num_roles
            self._resample_key = 0
            self.batches_per_epoch = max(1, cfg.epoch_size() // (d.batch_size * world_size))

    # Position ---------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        if self.source == "synthetic":
            return self.batches // self.batches_per_epoch
        if self.cfg.data.resampled:
            return self.batches // self.batches_per_epoch
        return min(e for e, _ in self._starts)

    def stats(self) -> dict[str, int]:
        """Samples decoded and bad samples skipped by the workers of this iterator (for 'wds')."""
        good = sum(g for g, _ in self._worker_counts.values())
        bad = sum(b for _, b in self._worker_counts.values())
        return {"good": self.good + good, "bad": self.bad + bad}

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"source": self.source, "batches": self.batches, "seed": self.seed,
                              "world_size": self.world_size, "num_workers": self.num_roles}
        if self.source == "synthetic":
            sd["epoch"], sd["batch"] = divmod(self.batches, self.batches_per_epoch)
            sd["batches_per_epoch"] = self.batches_per_epoch
        else:
            sd["resampled"] = bool(self.cfg.data.resampled)
            sd["positions"] = [list(p) for p in self._starts]
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("source") != self.source:
            raise DataError(f"data position was saved for source {sd.get('source')!r}, "
                            f"this run reads {self.source!r}")
        self._it = None
        self._it_id += 1
        if self.source == "synthetic":
            epoch, b = int(sd["epoch"]), int(sd["batch"])
            if sd.get("world_size", self.world_size) != self.world_size:
                # Same epoch and same share of it done, split over the new number of ranks.
                b = b * int(sd["world_size"]) // self.world_size
                warnings.warn("data position saved with another world size: resuming at the same "
                              "point of the epoch, not bit-identically", stacklevel=2)
            self.batches = epoch * self.batches_per_epoch + min(b, self.batches_per_epoch)
            return
        self.batches = int(sd["batches"])
        if self.cfg.data.resampled:
            self._resample_key = self.batches
            return
        same = sd.get("world_size") == self.world_size and sd.get("num_workers") == self.num_roles
        positions = [tuple(p) for p in sd.get("positions", [])]
        if same and len(positions) == self.num_roles and not sd.get("resampled", False):
            self._starts = [(int(e), int(n)) for e, n in positions]
        else:
            e0 = min((int(e) for e, _ in positions), default=0)
            warnings.warn(f"data position saved with world_size={sd.get('world_size')}, num_workers="
                          f"{sd.get('num_workers')}, resampled={sd.get('resampled')}; this run has "
                          f"{self.world_size}, {self.num_roles}, {self.cfg.data.resampled}: restarting "
                          f"at the beginning of epoch {e0}, not bit-identically", stacklevel=2)
            self._starts = [(e0, 0)] * self.num_roles

    # Iteration --------------------------------------------------------------------------------
    def _dataset(self, normalize_in_worker: bool) -> IterableDataset:
        d = self.cfg.data
        scale = (d.crop_min_scale, 1.0)
        if self.source == "synthetic":
            return SyntheticTrainSource(
                self._images, self._labels, batch_size=d.batch_size, img_size=d.img_size, scale=scale,
                hflip=d.hflip, seed=self.seed, rank=self.rank, world_size=self.world_size,
                num_roles=self.num_roles, start=self.batches, normalize_in_worker=normalize_in_worker)
        return WdsTrainSource(
            self.urls, img_size=d.img_size, batch_size=d.batch_size, scale=scale, hflip=d.hflip,
            shuffle_buffer=d.shuffle_buffer, max_bad_fraction=d.max_bad_fraction, seed=self.seed,
            rank=self.rank, world_size=self.world_size, num_roles=self.num_roles,
            # The next batch to hand out is worker (batches mod W)'s: the new loader's worker 0
            # must play that role for the round-robin order to continue unchanged.
            rotation=self.batches % self.num_roles, starts=list(self._starts),
            resampled=d.resampled, resample_key=self._resample_key, gpu=self.gpu,
            normalize_in_worker=normalize_in_worker, labels=LabelPolicy(False, d.num_classes),
            max_pixels=d.max_image_pixels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._it_id += 1
        return self._run(self._it_id)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = iter(self)
        return next(self._it)

    def _run(self, it_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dev = self.device
        on_device = dev is not None and dev.type != "cpu"
        ds = self._dataset(normalize_in_worker=not on_device and not self.gpu)
        pin = torch.cuda.is_available() and (dev is None or on_device)
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            kw["prefetch_factor"] = 2
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=pin, **kw)
        # Counts of an earlier iterator's workers are folded in; this one's workers start at 0.
        s = self.stats()
        self.good, self.bad, self._worker_counts = s["good"], s["bad"], {}
        for payload, labels, meta in loader:
            if it_id != self._it_id:
                raise RuntimeError("this TrainStream iterator was retired by a newer iter(stream) "
                                   "or load_state_dict; use the newest one")
            if self.gpu:
                payload, labels = self._gpu_finish(payload["items"], labels)
            if on_device or self.gpu:
                payload = normalize(payload.to(dev, non_blocking=True))
                labels = labels.to(dev, non_blocking=True)
            self.batches += 1
            if "role" in meta:
                self._starts[meta["role"]] = tuple(meta["pos"])
                self._worker_counts[meta["role"]] = (meta["good"], meta["bad"])
            yield payload, labels

    def _gpu_finish(self, items: list[Any], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the batch's JPEGs on the GPU and crop + flip them there."""
        dev = self.device
        S = self.cfg.data.img_size
        jpeg_pos = [k for k, it in enumerate(items) if isinstance(it, dict)]
        decoded = decode_jpegs([items[k]["jpeg"] for k in jpeg_pos], dev)
        out: list[torch.Tensor | None] = [None if isinstance(it, dict) else it.to(dev) for it in items]
        for k, img in zip(jpeg_pos, decoded):
            if img is None:
                self.bad += 1
                log.warning("skipping a JPEG the GPU and PIL decoders both reject (batch %d)", self.batches)
                continue
            out[k] = crop_resize_flip(img, CropBox(*items[k]["box"]), S, bool(items[k]["flip"]))
        keep = [k for k, o in enumerate(out) if o is not None]
        if not keep:
            raise DataError(f"no image of batch {self.batches} could be decoded")
        # Keep the batch shape fixed (compiled models): a rejected sample is replaced by a
        # decoded one of the same batch, image and label; it is counted in stats()["bad"].
        src = [k if out[k] is not None else keep[0] for k in range(len(out))]
        return torch.stack([out[k] for k in src]), labels[src]  # type: ignore[misc]

    def close(self) -> None:
        """Stop the current iterator's workers."""
        self._it_id += 1
        self._it = None


def build_train_stream(cfg: Config, rank: int = 0, world_size: int = 1,
                       device: torch.device | str | None = None) -> TrainStream:
    """The trainer's data: see `TrainStream` and the module docstring (resume rule)."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
    if cfg.data.source == "resident":
        from .resident import ResidentStream
        return ResidentStream(cfg, rank, world_size, device)  # type: ignore[return-value]  # same interface
    return TrainStream(cfg, rank, world_size, device)


__all__ = ["TrainStream", "build_train_stream"]
