"""The worker sources: datasets that run in the DataLoader workers and yield whole batches.

Reading (`WdsTrainSource`, source 'wds'): ranks x workers = S "slots"; slot s = rank * W +
worker. Without resampling, epoch e permutes the shard list with a seed keyed on (seed, e) (the
same on every rank) and slot s reads shards perm[s::S] in that order, so ranks and workers read
disjoint shards and S may not exceed the number of shards (a run resumed on another shape first
finishes the old slots' interrupted epochs: shard_layout.py). Samples pass through a shuffle
buffer of raw bytes (data.shuffle_buffer) that is emptied at the end of each epoch of a slot,
then are decoded with PIL, cropped and flipped (each sample's generator keyed on (seed, epoch,
slot, index in epoch)) and batched in the worker. With `resampled`, each slot instead draws
shards with replacement from its own seeded generator, forever.

`SyntheticTrainSource` serves the built-in set (see synthetic.py) the same way; the resident
set (resident.py) needs no workers and has its own stream.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .badsamples import BadSampleCounter, DataError
from .placement import Placement
from .shard_layout import Layout, rests_of, resumed_origin, still_needed
from .shuffle import buffer_rng, global_batches_per_epoch, shuffled
from .synthetic import synthetic_split
from .tar import _DEFAULT_LABELS, LabelPolicy, RawSample, iter_shard
from .transforms import (
    generator_for,
    mix_seed,
    normalize,
    open_image,
    random_resized_crop_batch,
    sample_crop_flip,
    single_thread,
    train_transform,
)
from .urls import expand_urls

if TYPE_CHECKING:
    from ..config import Config

# Domain tags for `generator_for` / `derive_seed`, so no two random streams share a key
# (11, the shard order, and 12, the shuffle buffer, are shuffle.py's; 23-24 are resident.py's).
_TAG_AUG = 13
_TAG_RESAMPLE = 14
_TAG_SYN_PERM = 21
_TAG_SYN_AUG = 22


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


class WdsTrainSource(IterableDataset):
    """Endless batches (payload, labels, meta) of one rank; see the module docstring.

    payload: uint8 (B,3,S,S) images, float32 normalised ones when `normalize_in_worker`, or, for
    GPU decode, {"items": [...]}: per sample a dict of JPEG bytes + crop box + flip, or a
    CPU-decoded uint8 crop for images nvjpeg cannot take (non-JPEG, CMYK).
    meta: {"role", "pos": (epoch, samples out of the buffer in it), "good", "bad"} of the worker.
    """

    def __init__(self, urls: list[str], *, img_size: int, batch_size: int, scale: tuple[float, float],
                 hflip: bool, shuffle_buffer: int, max_bad_fraction: float, seed: int, rank: int,
                 world_size: int, num_roles: int, rotation: int, starts: list[tuple[int, int]],
                 resampled: bool, resample_key: int, gpu: bool, normalize_in_worker: bool,
                 labels: LabelPolicy = _DEFAULT_LABELS, max_pixels: int | None = None,
                 layout: Layout | None = None) -> None:
        super().__init__()
        self.urls = urls
        self.img_size, self.batch_size, self.scale, self.hflip = img_size, batch_size, scale, hflip
        self.shuffle_buffer, self.max_bad_fraction, self.seed = shuffle_buffer, max_bad_fraction, seed
        self.rank, self.world_size, self.num_roles, self.rotation = rank, world_size, num_roles, rotation
        self.starts, self.resampled, self.resample_key = starts, resampled, resample_key
        self.gpu, self.normalize_in_worker = gpu, normalize_in_worker
        self.labels, self.max_pixels = labels, max_pixels
        self.layout = layout or Layout(len(urls), seed, world_size * num_roles)

    # What a subclass of another sample kind replaces (video.py's clip shards).
    _read_shard = staticmethod(iter_shard)
    _normalize = staticmethod(normalize)

    def _collate(self, items: list[Any], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(items), torch.tensor(labels, dtype=torch.int64)

    # One slot's sample stream: yields (epoch, index in epoch, raw sample); index counts
    # samples out of the shuffle buffer, the unit of the saved position.
    def _positions(self, slot: int, role: int, counter: BadSampleCounter) -> Iterator[tuple[int, int, RawSample]]:
        if self.resampled:
            rng = random.Random(mix_seed(self.seed, _TAG_RESAMPLE, self.resample_key, slot))

            def draws() -> Iterator[RawSample]:
                empty = 0
                while True:
                    got = False
                    for s in self._read_shard(self.urls[rng.randrange(len(self.urls))], counter, self.labels):
                        got = True
                        yield s
                    empty = 0 if got else empty + 1
                    if empty >= max(8, 2 * len(self.urls)):
                        raise DataError(f"{empty} shards in a row gave no readable sample "
                                        f"(shards: {self.urls[0]} ...)")

            buf_rng = random.Random(rng.getrandbits(63))
            for i, s in enumerate(shuffled(draws(), self.shuffle_buffer, buf_rng)):
                yield 0, i, s
            return
        epoch, skip = self.starts[role]
        empty_epochs = 0
        while True:
            pieces = self.layout.pieces(slot, epoch)
            mine = [self.urls[u] for u, _ in pieces]

            def samples(pieces: list = pieces) -> Iterator[RawSample]:
                for u, wanted in pieces:
                    got = self._read_shard(self.urls[u], counter, self.labels)
                    if wanted is None:
                        yield from got
                        continue
                    want = set(wanted)  # the samples an interrupted epoch left of this shard
                    yield from (s for k, s in enumerate(got) if k in want)

            buf_rng = buffer_rng(self.seed, epoch, slot)
            replay = skip > 0
            counter.enabled = not replay
            i = -1
            for i, s in enumerate(shuffled(samples(), self.shuffle_buffer, buf_rng)):
                if i < skip:
                    continue
                if replay:
                    replay, counter.enabled = False, True
                yield epoch, i, s
            counter.enabled = True
            if not self.layout.is_rest(epoch):  # a rest epoch may leave this slot nothing
                empty_epochs = 0 if i >= 0 else empty_epochs + 1
            if empty_epochs >= 2:
                raise DataError(f"reader {slot} (rank {self.rank}) found no readable sample in its "
                                f"shards {mine} for two epochs")
            epoch, skip = epoch + 1, 0

    def _decode(self, raw: RawSample, gen: torch.Generator, counter: BadSampleCounter) -> Any:
        S = self.img_size
        try:
            if self.gpu:
                img = open_image(raw.data, self.max_pixels)  # header only: size, mode, crop box
                if img.format == "JPEG" and img.mode in ("RGB", "L"):
                    box, flip = sample_crop_flip(img.size[0], img.size[1], self.scale, self.hflip, gen)
                    # A dict, not a tuple: DataLoader's convert/pin steps turn tuples into lists.
                    return {"jpeg": torch.frombuffer(bytearray(raw.data), dtype=torch.uint8),
                            "box": list(box), "flip": flip}
            return train_transform(raw.data, S, self.scale, hflip=self.hflip, gen=gen,
                                   max_pixels=self.max_pixels)
        except Exception as e:  # untrusted bytes: any decoder failure means a bad sample
            counter.record(raw.shard, raw.key, f"cannot decode image: {type(e).__name__}: {str(e)[:160]}")
            return None

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor, dict[str, Any]]]:
        role = (_worker_id() + self.rotation) % self.num_roles
        slot = self.rank * self.num_roles + role
        counter = BadSampleCounter(self.max_bad_fraction, f"rank {self.rank} reader {role}")
        B = self.batch_size
        items: list[Any] = []
        labels: list[int] = []
        for epoch, i, raw in self._positions(slot, role, counter):
            key = (self.resample_key, slot, i) if self.resampled else (epoch, slot, i)
            out = self._decode(raw, generator_for(self.seed, _TAG_AUG, int(self.resampled), *key), counter)
            if out is None:
                continue
            counter.ok()
            items.append(out)
            labels.append(raw.label)
            if len(items) < B:
                continue
            meta = {"role": role, "pos": (epoch, i + 1), "good": counter.good, "bad": counter.bad}
            if self.gpu:
                payload: Any = {"items": items}
                lab = torch.tensor(labels, dtype=torch.int64)
            else:
                with single_thread():
                    payload, lab = self._collate(items, labels)
                    if self.normalize_in_worker:
                        payload = self._normalize(payload)
            items, labels = [], []
            yield payload, lab, meta


class SyntheticTrainSource(IterableDataset):
    """Endless batches of the synthetic set for one rank: epoch e visits a permutation keyed on
    (seed, e); rank r takes global batches b * world + r (placement.py, also after a resume on
    another shape); batch j of this rank goes to worker (j - start) mod W; augmentation is keyed on
    (seed, epoch, first position / micro-batch), i.e. the global batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, img_size: int,
                 scale: tuple[float, float], hflip: bool, seed: int, placement: Placement,
                 num_roles: int, start: int, normalize_in_worker: bool) -> None:
        super().__init__()
        self.images, self.labels = images, labels
        self.batch_size, self.img_size, self.scale, self.hflip = batch_size, img_size, scale, hflip
        self.seed, self.placement, self.num_roles = seed, placement, num_roles
        self.start, self.normalize_in_worker = start, normalize_in_worker

    def batch(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch j (0, 1, ... across epochs) of this rank: uint8 images and labels."""
        epoch, first = self.placement.locate(j)
        perm = torch.randperm(len(self.images), generator=generator_for(self.seed, _TAG_SYN_PERM, epoch))
        idx = perm[first : first + self.batch_size]
        gen = generator_for(self.seed, _TAG_SYN_AUG, epoch, first // self.batch_size)
        out = random_resized_crop_batch(self.images[idx], self.img_size, self.scale, self.hflip, gen)
        return out, self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        j = self.start + _worker_id()
        while True:
            with single_thread():
                imgs, labels = self.batch(j)
                if self.normalize_in_worker:
                    imgs = normalize(imgs)
            yield imgs, labels, {"j": j}
            j += self.num_roles




# Main-process side: what the stream needs of a source ---------------------------------------
class TrainSource(Protocol):
    """One kind of worker source, seen from `stream.TrainStream` in the main process: checks and
    holds what its workers need, builds their dataset for the current position, and owns the
    part of the position that is its own (the stream keeps the count of batches handed out)."""

    gpu_decode: ClassVar[bool]  # whether data.gpu_decode applies (JPEGs handed to the GPU)
    batches_per_epoch: int

    def epoch(self, batches: int) -> int: ...

    def state_dict(self, batches: int) -> dict[str, Any]: ...

    def load_state_dict(self, sd: dict[str, Any]) -> int:
        """Take a saved position; returns the number of batches handed out to continue from."""

    def on_batch(self, meta: dict[str, Any]) -> None:
        """A worker's batch was handed out; `meta` is what the worker sent with it."""

    def dataset(self, batches: int, *, gpu: bool, normalize_in_worker: bool) -> IterableDataset:
        """The workers' dataset that continues after `batches` batches handed out."""


class SyntheticSource:
    """The built-in set: the position is (epoch, batch index), exact on resume."""

    gpu_decode: ClassVar[bool] = False

    def __init__(self, cfg: Config, rank: int, world_size: int, num_roles: int) -> None:
        d = cfg.data
        self.cfg, self.rank, self.world_size, self.num_roles = cfg, rank, world_size, num_roles
        self.seed = cfg.engine.seed
        self._images, self._labels = synthetic_split(
            "train", d.synthetic_images, d.synthetic_classes, d.img_size, kind=d.synthetic_kind)
        self.batches_per_epoch = global_batches_per_epoch(
            len(self._images), d.batch_size, world_size, "data.synthetic_images")
        self.placement = Placement(len(self._images), d.batch_size, world_size, rank)

    def epoch(self, batches: int) -> int:
        return self.placement.epoch(batches)

    def state_dict(self, batches: int) -> dict[str, Any]:
        return {**self.placement.state_dict(batches), "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, sd: dict[str, Any]) -> int:
        # Another rank count or micro-batch: the rest of the interrupted epoch is re-split.
        return self.placement.load_state_dict(sd)[0]

    def on_batch(self, meta: dict[str, Any]) -> None:
        pass  # the position follows from the batch count alone

    def dataset(self, batches: int, *, gpu: bool, normalize_in_worker: bool) -> IterableDataset:
        d = self.cfg.data
        scale = (d.crop_min_scale, 1.0)
        return SyntheticTrainSource(
            self._images, self._labels, batch_size=d.batch_size, img_size=d.img_size, scale=scale,
            hflip=d.hflip, seed=self.seed, placement=self.placement,
            num_roles=self.num_roles, start=batches, normalize_in_worker=normalize_in_worker)


class WdsSource:
    """WebDataset shards: the position adds each worker's (epoch, samples out of its shuffle
    buffer), or, resampled, the batch count the stream was re-seeded from (stream.py). A position
    saved by another rank count or worker count continues with the old slots' unfinished epochs
    re-split (shard_layout.py), given every old rank's position (engine/reshape.py hands them in
    as `slot_positions`)."""

    gpu_decode: ClassVar[bool] = True
    read_shard = staticmethod(iter_shard)  # what a sample is: counted when a moved run replays

    def __init__(self, cfg: Config, rank: int, world_size: int, num_roles: int) -> None:
        d = cfg.data
        self.cfg, self.rank, self.world_size, self.num_roles = cfg, rank, world_size, num_roles
        self.seed = cfg.engine.seed
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
        self._origin: dict[str, Any] | None = None  # the shape this run was moved from (shard_layout.py)
        self._layout = Layout(len(self.urls), self.seed, slots)
        self._sizes: dict[int, int] = {}  # readable samples per shard, counted when a moved run replays
        self.batches_per_epoch = max(1, cfg.epoch_size() // (d.batch_size * world_size))

    def epoch(self, batches: int) -> int:
        if self.cfg.data.resampled:
            return batches // self.batches_per_epoch
        return min(e for e, _ in self._starts)

    def state_dict(self, batches: int) -> dict[str, Any]:
        return {"resampled": bool(self.cfg.data.resampled), "positions": [list(p) for p in self._starts],
                "origin": self._origin, "num_shards": len(self.urls),
                "shuffle_buffer": int(self.cfg.data.shuffle_buffer)}

    def load_state_dict(self, sd: dict[str, Any]) -> int:
        batches = int(sd["batches"])
        if self.cfg.data.resampled:
            self._resample_key = batches
            return batches
        same = sd.get("world_size") == self.world_size and sd.get("num_workers") == self.num_roles
        positions = [tuple(p) for p in sd.get("positions", [])]
        every = [(int(e), int(n)) for e, n in sd["slot_positions"]] if sd.get("slot_positions") else None
        # The old slots' reading is replayed from the shard list and buffer size they had.
        replayable = (not sd.get("resampled", False)
                      and sd.get("num_shards", len(self.urls)) == len(self.urls)
                      and sd.get("shuffle_buffer", self.cfg.data.shuffle_buffer) == self.cfg.data.shuffle_buffer)
        if same and len(positions) == self.num_roles and not sd.get("resampled", False):
            self._starts = [(int(e), int(n)) for e, n in positions]
            self._origin = still_needed(sd.get("origin"), every)
        elif replayable and every and len(every) == int(sd["world_size"]) * int(sd["num_workers"]):
            self._origin = resumed_origin(sd, every)
            self._starts = [(min(e for e, _ in every), 0)] * self.num_roles
        else:
            e0 = min((int(e) for e, _ in (every or positions)), default=0)
            why = ("the shard list or data.shuffle_buffer changed" if not replayable and not sd.get("resampled")
                   else "the checkpoint lacks every rank's position" if not every else "")
            # stacklevel 3: the warning points at the caller of TrainStream.load_state_dict.
            warnings.warn(f"data position saved with world_size={sd.get('world_size')}, num_workers="
                          f"{sd.get('num_workers')}, resampled={sd.get('resampled')}; this run has "
                          f"{self.world_size}, {self.num_roles}, {self.cfg.data.resampled}"
                          f"{f' ({why})' if why else ''}: restarting at the beginning of epoch {e0}, "
                          "not bit-identically", stacklevel=3)
            self._starts = [(e0, 0)] * self.num_roles
            self._origin = None
        self._layout = Layout(len(self.urls), self.seed, self.world_size * self.num_roles,
                              rests_of(self._origin, len(self.urls), self.seed, self.cfg.data.shuffle_buffer,
                                       self._shard_size))
        return batches

    def _shard_size(self, u: int) -> int:
        """Readable samples of shard u (tar members read, nothing decoded), once per shard."""
        sizes = self._sizes
        if u not in sizes:
            counter = BadSampleCounter(1.0, "a resumed run's replay")
            counter.enabled = False  # the run that read these counted their bad samples
            labels = LabelPolicy(False, self.cfg.data.num_classes)
            sizes[u] = sum(1 for _ in type(self).read_shard(self.urls[u], counter, labels))
        return sizes[u]

    def on_batch(self, meta: dict[str, Any]) -> None:
        self._starts[meta["role"]] = tuple(meta["pos"])

    def dataset(self, batches: int, *, gpu: bool, normalize_in_worker: bool) -> IterableDataset:
        d = self.cfg.data
        scale = (d.crop_min_scale, 1.0)
        return WdsTrainSource(
            self.urls, img_size=d.img_size, batch_size=d.batch_size, scale=scale, hflip=d.hflip,
            shuffle_buffer=d.shuffle_buffer, max_bad_fraction=d.max_bad_fraction, seed=self.seed,
            rank=self.rank, world_size=self.world_size, num_roles=self.num_roles,
            # The next batch to hand out is worker (batches mod W)'s: the new loader's worker 0
            # must play that role for the round-robin order to continue unchanged.
            rotation=batches % self.num_roles, starts=list(self._starts),
            resampled=d.resampled, resample_key=self._resample_key, gpu=gpu,
            normalize_in_worker=normalize_in_worker, labels=LabelPolicy(False, d.num_classes),
            max_pixels=d.max_image_pixels, layout=self._layout)


__all__ = ["WdsTrainSource", "SyntheticTrainSource", "TrainSource", "SyntheticSource", "WdsSource"]
