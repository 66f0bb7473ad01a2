"""The streaming eval data path: train / val shards read through the pretraining tar reader.

Memory is bounded by the chunk, the shuffle buffer and the DataLoader's prefetch, never by the
size of the split: nothing here holds more than a few chunks of decoded images.

Logical readers. A split is read by R *logical readers* (`readers`), fixed by the user and
independent of the number of ranks and workers (the CLI's default, `default_readers`, a multiple
of the rank count that divides the train shards where it can): rank k hosts readers r = k, k + N,
k + 2N, ... (N ranks), and the rank's DataLoader workers split those further. Reader r reads

- shard-level: the shards `order[r::R]` (`order` a permutation keyed on (seed, epoch) for the
  augmented train stream, the listed order for a deterministic pass), when there are at least R
  shards and no image cap;
- shard-split, for a deterministic pass (no augmentation) over fewer shards (n) than readers with
  no cap: reader r reads the one shard r % n, shared by the c readers with the same r % n (c =
  R // n, plus one for the first R % n shards), and keeps its samples whose ordinal j in the shard
  has j % c == r // n. Each shard's bytes are read c ~ R / n times (ImageNet val's 50 shards on 640
  readers: 12 or 13 times), never R times. A reader may get more or fewer samples than another
  (a short last shard, c not the same for every shard), or none: a single pass does not care;
- sample-level otherwise (an image cap, or the endless augmented stream over fewer shards than
  readers, whose steps take the same share from every reader and so need every reader to hold
  the same number of samples, within one): every shard in listed order, keeping the samples whose
  running index g (over all shards, tar order) has g % R == r and g < max_images. Each reader
  then reads the bytes of every shard, or of the capped prefix.

Every sample carries its id (shard index, ordinal in its shard), so a deterministic pass gives
the same (id -> features) on any number of ranks, and the augmented stream draws each crop and
flip from a generator keyed on (seed, epoch, reader, index in the reader's epoch). Because the
global batch of the augmented stream is "the next G / R samples of every reader" (`batch_shares`
when R does not divide G), its content does not depend on how many ranks or workers host the
readers.

Bad samples: counted per reader with the pretraining rule (badsamples.BadSampleCounter, the
message names shard and key, fatal past data.max_bad_fraction); a sample whose image does not
decode is skipped and the reader's next one takes its place in the chunk.

Position: per reader (epoch, samples out of its shuffle buffer in that epoch); a resumed reader
replays its epoch up to there without decoding (so the buffer refills exactly) and continues.

The fine-tune's fields: `rand_augment` (timm's RandAugment after the crop and flip, its draws
keyed like them, eval/ft_augment.py), `repeats` (views of each sample side by side, view k > 0
keyed on (epoch, reader, index, k)), `clip_frames` (clip shards, data/video.py's layout: one box
and flip for all frames of a window). The fine-tune hosts contiguous blocks of readers per rank
(`blocks`), because its micro-batches are runs of consecutive readers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldae_fast.data.badsamples import BadSampleCounter, DataError
from ldae_fast.data.shuffle import shard_order, shuffled
from ldae_fast.data.tar import LabelPolicy, RawSample, iter_shard
from ldae_fast.data.transforms import (
    eval_transform,
    generator_for,
    mix_seed,
    single_thread,
    train_transform,
)
from ldae_fast.data.urls import expand_urls
from ldae_fast.errors import UsageError

from .ft_augment import apply_rand_augment, rand_augment

# Domain tags of the eval stream's draws (the data pipeline owns 11-29; see seeding.py).
_TAG_EVAL_BUFFER = 26
_TAG_EVAL_AUG = 27

PROBE_SCALE = (0.08, 1.0)
"""MAE's linear-probe RandomResizedCrop scale (main_linprobe.py: 0.08-1, ratio 3/4-4/3, flip)."""


@dataclass(frozen=True)
class SplitSpec:
    """What one split reads and how it is transformed."""

    urls: tuple[str, ...]
    what: str  # the config field or flag the shards came from, for messages
    img_size: int
    augment: bool  # True: RandomResizedCrop(scale) + flip; False: resize + centre crop
    scale: tuple[float, float] = PROBE_SCALE
    shuffle_buffer: int = 0
    seed: int = 0
    max_images: Optional[int] = None
    max_bad_fraction: float = 0.01
    max_pixels: Optional[int] = None
    num_classes: int = 0
    readers: int = 16
    rand_augment: str = ""
    """timm RandAugment spec applied after the crop and flip ('' : none); the fine-tune's."""
    repeats: int = 1
    """Augmented views of each sample, side by side in the stream (repeated augmentation)."""
    clip_frames: int = 0
    """> 0: the shards hold clips (KEY.frames.npy, data/video.py); read windows of this many frames."""
    frame_stride: int = 1

    @property
    def shard_level(self) -> bool:
        return self.max_images is None and len(self.urls) >= self.readers


def split_spec(cfg, split: str, *, augment: bool, readers: int = 16, seed: int = 0,
               max_images: Optional[int] = None, shuffle_buffer: Optional[int] = None,
               **extra: Any) -> SplitSpec:
    """The SplitSpec of cfg.data's train or val shards (`extra`: the fine-tune's SplitSpec fields;
    clip shards (data.source 'wds-video') read data.num_frames at data.frame_stride)."""
    d = cfg.data
    what = "data.train_shards" if split == "train" else "data.val_shards"
    urls = expand_urls(d.train_shards if split == "train" else d.val_shards, what)
    if readers < 1:
        raise UsageError(f"--readers={readers} must be >= 1")
    buf = (d.shuffle_buffer if augment else 0) if shuffle_buffer is None else shuffle_buffer
    if d.source == "wds-video":
        extra = dict(clip_frames=d.num_frames, frame_stride=d.frame_stride, **extra)
    return SplitSpec(tuple(urls), what, d.img_size, augment, PROBE_SCALE, buf, seed, max_images,
                     d.max_bad_fraction, d.max_image_pixels, d.num_classes, readers, **extra)


def readers_of_rank(spec: SplitSpec, rank: int, world_size: int, blocks: bool = False) -> list[int]:
    """The logical readers rank `rank` hosts: every N-th (k, k + N, ...), or with `blocks` the
    rank's contiguous block (the fine-tune, whose micro-batches are runs of consecutive readers)."""
    if spec.readers % world_size:
        raise UsageError(f"--readers={spec.readers} is not a multiple of the {world_size} ranks: every "
                         f"rank must host as many logical readers as the others")
    if blocks:
        per = spec.readers // world_size
        return list(range(rank * per, (rank + 1) * per))
    return list(range(rank, spec.readers, world_size))


# One logical reader ---------------------------------------------------------------------------
def _shard_reader(spec: SplitSpec):
    if spec.clip_frames:
        from ldae_fast.data.video import iter_video_shard

        return iter_video_shard
    return iter_shard


class _BadShare:
    """The bad samples a reader owns among those the tar reader finds in what several readers
    read: every `share`-th from offset `k`, as the good ones. Counting all of them against the
    reader's own good samples would inflate its bad fraction `share` times (a clean split read
    by 512 readers would stop at one bad sample in 200)."""

    def __init__(self, counter: BadSampleCounter, share: int, k: int) -> None:
        self.counter, self.share, self.k, self.seen = counter, share, k, 0

    @property
    def enabled(self) -> bool:
        return self.counter.enabled

    def record(self, shard: str, key: str, reason: str) -> None:
        if self.seen % self.share == self.k:
            self.counter.record(shard, key, reason)
        self.seen += 1


def _epoch_samples(spec: SplitSpec, reader: int, epoch: int, counter: BadSampleCounter
                   ) -> Iterator[tuple[tuple[int, int], RawSample]]:
    """(id, raw sample) of one reader's epoch, before the shuffle buffer."""
    labels = LabelPolicy(True, spec.num_classes)
    n = len(spec.urls)
    R = spec.readers
    read = _shard_reader(spec)
    if spec.shard_level:
        order = shard_order(n, spec.seed, epoch) if spec.augment else list(range(n))
        for s in order[reader::R]:
            for j, raw in enumerate(read(spec.urls[s], counter, labels)):
                yield (s, j), raw
        return
    if spec.max_images is None and not spec.augment:
        pos, k = reader % n, reader // n
        share = R // n + (1 if pos < R % n else 0)
        for j, raw in enumerate(read(spec.urls[pos], _BadShare(counter, share, k), labels)):
            if j % share == k:
                yield (pos, j), raw
        return
    g = 0
    cap = spec.max_images if spec.max_images is not None else float("inf")
    bad = _BadShare(counter, R, reader)
    for s in range(n):
        for j, raw in enumerate(read(spec.urls[s], bad, labels)):
            if g >= cap:
                return
            if g % R == reader:
                yield (s, j), raw
            g += 1


def reader_samples(spec: SplitSpec, reader: int, start: tuple[int, int], counter: BadSampleCounter,
                   epochs: Optional[int]) -> Iterator[tuple[int, int, tuple[int, int], RawSample]]:
    """(epoch, index out of the buffer, id, raw) from position `start`, for `epochs` epochs
    (None: forever). Samples before `start` in its epoch are replayed unseen and uncounted."""
    epoch, skip = start
    empty = 0
    while epochs is None or epoch < epochs:
        rng = random.Random(mix_seed(spec.seed, _TAG_EVAL_BUFFER, epoch, reader))
        counter.enabled = skip == 0
        i = -1
        for i, (sid, raw) in enumerate(shuffled(_epoch_samples(spec, reader, epoch, counter),
                                                spec.shuffle_buffer, rng)):
            if i < skip:
                continue
            counter.enabled = True
            yield epoch, i, sid, raw
        counter.enabled = True
        empty = 0 if i >= 0 else empty + 1
        if empty >= 2 and epochs is None:
            raise DataError(f"{spec.what}: logical reader {reader} of {spec.readers} found no readable "
                            f"sample in two passes ({len(spec.urls)} shard(s)"
                            + (f", max_images {spec.max_images}" if spec.max_images is not None else "")
                            + "); use fewer --readers")
        epoch, skip = epoch + 1, 0


def _decode(spec: SplitSpec, raw: RawSample, key: tuple[int, int, int], counter: BadSampleCounter,
            ra=None) -> Optional[list[torch.Tensor]]:
    """The sample's views (`spec.repeats` of them when augmenting, else one), or None (a bad
    sample, counted). View k > 0 of a repeated sample is keyed on (key, k); view 0 on key alone."""
    what = "clip" if spec.clip_frames else "image"
    try:
        if not spec.augment:
            return [_clip_view(spec, raw.data, None) if spec.clip_frames
                    else eval_transform(raw.data, spec.img_size, max_pixels=spec.max_pixels)]
        views = []
        for k in range(spec.repeats):
            vkey = key if k == 0 else (*key, k)
            gen = generator_for(spec.seed, _TAG_EVAL_AUG, *vkey)
            if spec.clip_frames:
                x = _clip_view(spec, raw.data, gen)
            else:
                x = train_transform(raw.data, spec.img_size, spec.scale, hflip=True, gen=gen,
                                    max_pixels=spec.max_pixels)
            if ra is not None:
                x = apply_rand_augment(ra, x, (spec.seed, *vkey))
            views.append(x)
        return views
    except Exception as e:  # untrusted bytes: any decoder failure is a bad sample
        counter.record(raw.shard, raw.key, f"cannot decode {what}: {type(e).__name__}: {str(e)[:160]}")
        return None


def _clip_view(spec: SplitSpec, data: bytes, gen: Optional[torch.Generator]) -> torch.Tensor:
    """uint8 (3, T, S, S): a window of the clip (its start drawn from `gen`, the first without),
    one RandomResizedCrop box + flip for all frames (`gen`) or the centre square resized."""
    from ldae_fast.data.transforms import CropBox, crop_resize_flip, random_resized_crop_tensor
    from ldae_fast.data.video import decode_clip

    clip = decode_clip(data, spec.clip_frames, spec.frame_stride, spec.max_pixels or 64_000_000, gen)
    C, T, H, W = clip.shape
    flat = clip.reshape(C * T, H, W)
    S = spec.img_size
    if gen is not None:
        out = random_resized_crop_tensor(flat, S, spec.scale, hflip=True, gen=gen)
    else:
        side = min(H, W)
        out = crop_resize_flip(flat, CropBox((W - side) // 2, (H - side) // 2, side, side), S, False)
    return out.reshape(C, T, S, S)


@dataclass
class Chunk:
    """Up to `n` decoded samples of one reader: uint8 images (n,3,S,S), labels (n,), ids (n,2)."""

    reader: int
    step: int
    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    pos: tuple[int, int]  # the reader's position after this chunk
    good: int = 0
    bad: int = 0
    last: bool = False  # a single pass ended with this chunk
    extra: dict = field(default_factory=dict)


class _Readers(IterableDataset):
    """The rank's logical readers, split across DataLoader workers; yields Chunks reader-major
    within a step (worker w hosts readers[w::W], all hosting the same number)."""

    def __init__(self, spec: SplitSpec, readers: list[int], starts: dict[int, tuple[int, int]],
                 chunk: int | dict[int, int], epochs: Optional[int], first_step: int) -> None:
        super().__init__()
        self.spec, self.readers, self.starts = spec, readers, starts
        self.chunk, self.epochs, self.first_step = chunk, epochs, first_step

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        mine = self.readers[info.id::info.num_workers] if info is not None else self.readers
        spec = self.spec
        counters = {r: BadSampleCounter(spec.max_bad_fraction, f"{spec.what} reader {r}") for r in mine}
        its = {r: reader_samples(spec, r, self.starts.get(r, (0, 0)), counters[r], self.epochs)
               for r in mine}
        pos = {r: self.starts.get(r, (0, 0)) for r in mine}
        done: set[int] = set()
        step = self.first_step
        S = spec.img_size
        shape = (3, spec.clip_frames, S, S) if spec.clip_frames else (3, S, S)
        ra = rand_augment(spec.rand_augment, S) if spec.rand_augment and spec.augment else None
        while len(done) < len(mine):
            for r in mine:
                if r in done:
                    continue
                imgs, labels, ids = [], [], []
                c = counters[r]
                last = False
                want = self.chunk[r] if isinstance(self.chunk, dict) else self.chunk
                while len(imgs) < want:
                    try:
                        epoch, i, sid, raw = next(its[r])
                    except StopIteration:
                        last = True
                        break
                    pos[r] = (epoch, i + 1)
                    views = _decode(spec, raw, (epoch, r, i), c, ra)
                    if views is None:
                        continue
                    c.ok()
                    imgs.extend(views)
                    labels.extend([raw.label] * len(views))
                    ids.extend([sid] * len(views))
                if last:
                    done.add(r)
                with single_thread():
                    x = torch.stack(imgs) if imgs else torch.empty(0, *shape, dtype=torch.uint8)
                yield Chunk(r, step, x, torch.tensor(labels, dtype=torch.int64),
                            torch.tensor(ids, dtype=torch.int64).view(-1, 2), pos[r], c.good, c.bad, last)
            step += 1


def batch_shares(global_batch: int, readers: int) -> dict[int, int]:
    """Images each logical reader gives to one global batch: G // R, one more for the first
    G mod R readers (a rule of the batch and the reader count alone)."""
    q, rem = divmod(global_batch, readers)
    return {r: q + (1 if r < rem else 0) for r in range(readers)}


def default_readers(world_size: int, num_workers: int, n_shards: int = 0, at_least: int = 16,
                    at_most: int = 0) -> int:
    """The reader count when the user sets none, always a multiple of the rank count (so valid on
    any number of ranks). Given `n_shards` (the train split's, read shard-level), a count that
    divides them, so every reader owns as many shards as the others and no image comes round more
    often than another in an epoch: the smallest multiple of ranks x workers >= `at_least` that
    does, else the smallest multiple of the ranks >= max(`at_least`, ranks x workers) that does,
    else the largest multiple of the ranks below that (fewer workers decode, but no reader has to
    read every shard). Else (no shard count, no divisor) the smallest multiple of ranks x workers
    >= `at_least`, or of the ranks when that one would exceed the shards. `at_most` (> 0: the
    probe's global batch, of which every reader gives at least one image) bounds the divisors."""
    unit = world_size * max(1, num_workers)
    lower = max(at_least, unit)
    top = min(n_shards, at_most) if at_most > 0 else n_shards

    def divisors(step: int, lo: int) -> list[int]:
        return [r for r in range(step * -(-lo // step), top + 1, step) if n_shards % r == 0]

    fits = divisors(unit, lower) or divisors(world_size, lower)
    if fits:
        return fits[0]
    below = divisors(world_size, max(at_least, world_size))
    if below:
        return below[-1]
    r = unit * -(-lower // unit)
    if n_shards and r > n_shards >= world_size * -(-lower // world_size):
        return world_size * -(-lower // world_size)
    return r


def _workers_for(n_readers: int, num_workers: int) -> int:
    """The most workers <= num_workers that split n_readers evenly (the round-robin order of
    the DataLoader then stays step-major)."""
    w = min(num_workers, n_readers)
    while w > 1 and n_readers % w:
        w -= 1
    return max(w, 0)


class EvalStream:
    """One rank's view of a split: `steps()` (the augmented, endless, resumable stream) and
    `once()` (one deterministic pass)."""

    def __init__(self, spec: SplitSpec, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 blocks: bool = False) -> None:
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.readers = readers_of_rank(spec, rank, world_size, blocks)
        self.num_workers = _workers_for(len(self.readers), num_workers)
        self.good = self.bad = 0
        self._counts: dict[int, tuple[int, int]] = {}

    def _loader(self, ds: _Readers) -> Iterator[Chunk]:
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            kw["prefetch_factor"] = 2
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, **kw)
        for ch in loader:
            self._counts[ch.reader] = (ch.good, ch.bad)
            yield ch

    def stats(self) -> dict[str, int]:
        return {"good": sum(g for g, _ in self._counts.values()),
                "bad": sum(b for _, b in self._counts.values())}

    def steps(self, per_reader: int | dict[int, int], first_step: int = 0,
              positions: Optional[dict[int, tuple[int, int]]] = None
              ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, dict[int, tuple[int, int]]]]:
        """Endless (step, images uint8, labels, positions of this rank's readers after the step):
        `per_reader` samples of each hosted reader per step (one count, or one per reader: see
        `batch_shares`), in reader order."""
        starts = {r: tuple(positions[r]) for r in self.readers} if positions else {}
        ds = _Readers(self.spec, self.readers, starts, per_reader, None, first_step)
        pos = {r: starts.get(r, (0, 0)) for r in self.readers}
        pending: dict[int, dict[int, Chunk]] = {}
        for ch in self._loader(ds):
            pending.setdefault(ch.step, {})[ch.reader] = ch
            got = pending.get(min(pending))
            if got is None or len(got) < len(self.readers):
                continue
            step = min(pending)
            del pending[step]
            parts = [got[r] for r in self.readers]
            for c in parts:
                pos[c.reader] = c.pos
            yield (step, torch.cat([c.images for c in parts]), torch.cat([c.labels for c in parts]),
                   dict(pos))

    def once(self, chunk: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One pass over the rank's share: (images uint8, labels, ids) chunks, any order."""
        ds = _Readers(self.spec, self.readers, {}, chunk, 1, 0)
        for ch in self._loader(ds):
            if ch.images.shape[0]:
                yield ch.images, ch.labels, ch.ids


def scan_split(spec: SplitSpec) -> tuple[int, int]:
    """(samples with an image and a label, 1 + the largest label) of the split, capped by
    max_images, through the reader: every byte of every shard is read, nothing decoded. The
    eval's own count reads only tar headers where it can (eval/split_info.scan_labels)."""
    counter = BadSampleCounter(1.0, spec.what)
    labels = LabelPolicy(True, spec.num_classes)
    n, top = 0, -1
    cap = spec.max_images if spec.max_images is not None else float("inf")
    read = _shard_reader(spec)
    for url in spec.urls:
        for raw in read(url, counter, labels):
            n += 1
            top = max(top, raw.label)
            if n >= cap:
                return n, top + 1
    return n, top + 1


def count_samples(spec: SplitSpec) -> int:
    return scan_split(spec)[0]


__all__ = ["SplitSpec", "split_spec", "EvalStream", "Chunk", "count_samples", "scan_split", "batch_shares", "default_readers", "readers_of_rank",
           "reader_samples", "PROBE_SCALE"]
