"""The training stream the trainer iterates, and its resume rule.

Resume rule (`TrainStream.state_dict`): the position is the number of batches handed out, plus,
for 'wds', each worker's (epoch, samples out of the shuffle buffer in that epoch) after the last
of its batches that was handed out (the reading order is sources.py's).
- resampled=False: exact. Each worker re-derives its epoch's shard order and shuffle-buffer
  seed, replays the epoch up to its saved sample count reading tar members only (no JPEG
  decode), and continues; batches are re-assigned to workers in the same round-robin order, so
  the resumed stream is bit-identical to the uninterrupted one. The replay costs reading at most
  one epoch of that worker's shards. With another world size or num_workers, the position of
  every old reader (the checkpoint keeps all ranks') says what the interrupted epochs have left,
  which the new readers split: none twice, none skipped (shard_layout.py). Without every rank's
  position (an older checkpoint) or with another shard list or shuffle buffer, the stream warns
  and restarts from the start of the earliest epoch in progress.
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
from .registry import source_for
from .sources import TrainSource
from .transforms import CropBox, crop_resize_flip, decode_jpegs, gpu_decode_available, normalize

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
        kind = source_for(cfg)
        # Clips (B, C, T, H, W) carry the channel axis elsewhere than images: the source says how.
        self._normalize = getattr(kind, "normalize", normalize)
        self.gpu = False
        if d.gpu_decode and kind.gpu_decode:
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
        self.src: TrainSource = kind(cfg, rank, world_size, self.num_roles)
        self.batches_per_epoch = self.src.batches_per_epoch

    # Position ---------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.src.epoch(self.batches)

    def stats(self) -> dict[str, int]:
        """Samples decoded and bad samples skipped by the workers of this iterator (for 'wds')."""
        good = sum(g for g, _ in self._worker_counts.values())
        bad = sum(b for _, b in self._worker_counts.values())
        return {"good": self.good + good, "bad": self.bad + bad}

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"source": self.source, "batches": self.batches, "seed": self.seed,
                              "world_size": self.world_size, "num_workers": self.num_roles}
        sd.update(self.src.state_dict(self.batches))
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("source") != self.source:
            raise DataError(f"data position was saved for source {sd.get('source')!r}, "
                            f"this run reads {self.source!r}")
        self._it = None
        self._it_id += 1
        self.batches = self.src.load_state_dict(sd)

    # Iteration --------------------------------------------------------------------------------
    def _dataset(self, normalize_in_worker: bool) -> IterableDataset:
        return self.src.dataset(self.batches, gpu=self.gpu, normalize_in_worker=normalize_in_worker)

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
            kw["worker_init_fn"] = _ignore_sigint
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
                payload = self._normalize(payload.to(dev, non_blocking=True))
                labels = labels.to(dev, non_blocking=True)
            self.batches += 1
            self.src.on_batch(meta)
            if "good" in meta:  # a worker that counts its good and bad samples
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


def _ignore_sigint(_worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the workers too: they keep serving the batch the trainer needs to
    finish its step and checkpoint (engine/preempt.py); the trainer ends them when it exits."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
