"""Video clips for DiffMAE: the built-in moving-shapes set, WebDataset clip shards (writer and
reader), and the two training sources. Batches are (B, C, T, H, W), normalised per channel.

Moving shapes (`data.synthetic_kind='moving-shapes'`): every clip is a pure function of (seed,
index), like the image set (synthetic.py). Over a two-colour gradient background with
low-frequency clutter, a class object (shape kind = label mod 8, synthetic.py's kinds) and a
distractor disc move at constant velocity and bounce off the borders (a reflected straight
line); pixel noise is drawn per frame. Label = index mod data.synthetic_classes.

Shard layout (`data.source='wds-video'`): one sample per clip, members
  KEY.frames.npy   the frames, a NumPy .npy array uint8 (T, H, W, C), C = 3 (or 1, repeated)
  KEY.cls          optional class index (ASCII), as in the image shards
read as a view of the payload after the .npy header was checked (dtype uint8, C order, 4-D, at
most data.max_image_pixels per frame and MAX_CLIP_FRAMES frames, exactly as many bytes as the
header claims; nothing is unpickled). A sample without frames, with
an unreadable or wrong-shaped array, too few frames or a bad label is a bad sample: logged with
shard and key, counted against data.max_bad_fraction (badsamples.py), and skipped.

Writer: `ldae-fast write-video-shards SRC OUT_PATTERN [--maxcount N] [--seed S] [--gzip]`;
SRC/<clip>/<frames> (unlabelled) or SRC/<class>/<clip>/<frames> (labelled, class index = sorted
folder order), frames in natural file-name order (f2 before f10), all of one size.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import re
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .badsamples import BadSampleCounter, DataError
from .placement import Placement
from .shards import IMAGE_SUFFIXES, check_out_pattern, write_tar_shards
from .shuffle import global_batches_per_epoch
from .sources import SyntheticSource, WdsSource, WdsTrainSource, _worker_id
from .synthetic import (
    DATASET_SEED,
    NUM_KINDS,
    _gradient_background,
    _hsv_to_rgb,
    _keyed_uniforms,
    _pixel_grid,
    _shape_mask,
    _upsample_matrix,
    synthetic_val_size,
)
from .tar import _DEFAULT_LABELS, LabelPolicy, RawSample, iter_shard
from .transforms import (
    CropBox,
    crop_resize_flip,
    generator_for,
    normalize,
    random_resized_crop_batch,
    random_resized_crop_tensor,
    single_thread,
)

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("ldae_fast.data")

FRAMES_EXT = "frames.npy"
MAX_CLIP_FRAMES = 4096
_VIDEO_TAG = 103  # keys the clips' random numbers apart from the image kinds'
_NUM_PARAMS = 24
_TAG_VID_PERM = 25  # 11-14 and 21-24 are shuffle.py's, sources.py's and resident.py's
_TAG_VID_AUG = 26


# Layout helpers ----------------------------------------------------------------------------------
def normalize_clips(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) uint8 or [0, 1] float -> float32 normalised per channel."""
    return normalize(x.transpose(1, 2)).transpose(1, 2).contiguous()


# Moving shapes -----------------------------------------------------------------------------------
def _bounce(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Positions of a point moving on a straight line reflected between lo and hi."""
    w = (hi - lo).clamp_min(1e-6)
    y = torch.remainder(x - lo, 2 * w)
    return lo + torch.where(y > w, 2 * w - y, y)


def _render_clips(indices: torch.Tensor, num_classes: int, frames: int, size: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    n, s, T = indices.numel(), size, frames
    labels = torch.remainder(indices, num_classes).to(torch.int64)
    rnd = _keyed_uniforms(indices, _NUM_PARAMS + 48 + 3 * T * s * s, seed, _VIDEO_TAG)
    p = rnd[:, :_NUM_PARAMS]
    clutter = rnd[:, _NUM_PARAMS:_NUM_PARAMS + 48].view(n, 3, 4, 4)
    noise = rnd[:, _NUM_PARAMS + 48:].view(n, 3, T, s, s).sub_(0.5).mul_(math.sqrt(12.0))
    yy, xx = _pixel_grid(s)
    sharp = s / 2.0
    bg_v, bg_a, bg_b, ramp = _gradient_background(p, xx, yy)
    up = _upsample_matrix(4, s)
    bg = torch.matmul(torch.matmul(up, (clutter - 0.5) * 0.3), up.T)
    bg.add_(bg_a).addcmul_(bg_b - bg_a, ramp.unsqueeze(1))
    img = bg.unsqueeze(2).repeat(1, 1, T, 1, 1)  # (n, 3, T, s, s)
    t = torch.arange(T, dtype=torch.float32).view(1, T)

    def track(i: int, r: torch.Tensor, speed_lo: float, speed_hi: float) -> tuple[torch.Tensor, torch.Tensor]:
        # Constant speed in a random direction (0.04 .. 0.12 of the half-width per frame), from a
        # random start, reflected at the borders so the whole object stays in view.
        ang = p[:, i] * 2 * math.pi
        speed = speed_lo + (speed_hi - speed_lo) * p[:, i + 1]
        lim = (1.0 - r).view(n, 1)
        x0 = (p[:, i + 2] * 2 - 1).view(n, 1) * lim
        y0 = (p[:, i + 3] * 2 - 1).view(n, 1) * lim
        cx = _bounce(x0 + (speed * torch.cos(ang)).view(n, 1) * t, -lim, lim)
        cy = _bounce(y0 + (speed * torch.sin(ang)).view(n, 1) * t, -lim, lim)
        return cx.view(n, T, 1, 1), cy.view(n, T, 1, 1)

    # The distractor first, so the class object moves over it.
    rd = 0.12 + 0.08 * p[:, 7]
    cx, cy = track(8, rd, 0.04, 0.12)
    m = (xx - cx).square_().add_((yy - cy).square_()).sqrt_().sub_(rd.view(n, 1, 1, 1)).mul_(-sharp).sigmoid_()
    dot = _hsv_to_rgb(p[:, 12], torch.full((n,), 0.6), torch.full((n,), 0.6)).view(n, 3, 1, 1, 1)
    img.lerp_(dot.expand_as(img), m.unsqueeze(1))

    r = 0.3 + 0.15 * p[:, 13]
    cx, cy = track(14, r, 0.04, 0.12)
    u, v = xx - cx, yy - cy  # (n, T, s, s)
    kind = torch.remainder(labels, NUM_KINDS)
    mask = torch.empty(n, T, s, s)
    for k in range(NUM_KINDS):
        sel = (kind == k).nonzero().flatten()
        if sel.numel():
            mask[sel] = _shape_mask(k, u[sel], v[sel], r[sel].view(-1, 1, 1, 1), sharp)
    fg_v = torch.remainder(bg_v + 0.35 + 0.3 * p[:, 18], 1.0).clamp(0.15, 1.0)
    fg = _hsv_to_rgb(p[:, 19], 0.45 + 0.55 * p[:, 20], fg_v).view(n, 3, 1, 1, 1)
    img.lerp_(fg.expand_as(img), mask.unsqueeze(1))
    img.addcmul_(noise, 0.02 + 0.03 * p[:, 21].view(n, 1, 1, 1, 1))
    return (img.clamp_(0, 1) * 255).round_().to(torch.uint8), labels


def make_moving_shapes(num_clips: int, num_classes: int, frames: int, size: int, seed: int = DATASET_SEED,
                       start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips [start, start + num_clips): uint8 (N, 3, T, S, S) and int64 labels (N,)."""
    if num_clips < 0 or num_classes < 2 or frames < 1 or size < 1:
        raise ValueError("make_moving_shapes needs num_clips >= 0, num_classes >= 2, frames >= 1, size >= 1")
    idx = torch.arange(start, start + num_clips, dtype=torch.int64)
    chunk = max(1, (1 << 18) // (frames * size * size))
    with single_thread():
        parts = [_render_clips(idx[i:i + chunk], num_classes, frames, size, seed)
                 for i in range(0, num_clips, chunk)]
    if not parts:
        return torch.empty(0, 3, frames, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])


@lru_cache(maxsize=4)
def moving_shapes_split(split: str, num_clips: int, num_classes: int, frames: int, size: int,
                        seed: int = DATASET_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """'train' ([0, num_clips)) or the disjoint 'val' split after it. Cached: do not modify."""
    if split == "train":
        return make_moving_shapes(num_clips, num_classes, frames, size, seed)
    if split == "val":
        return make_moving_shapes(synthetic_val_size(num_clips, num_classes), num_classes, frames, size,
                                  seed, start=num_clips)
    raise ValueError(f"unknown split {split!r}; choose 'train' or 'val'")


def video_eval_clips(cfg: Config, max_clips: int = 4) -> torch.Tensor:
    """Normalised val clips (B, C, T, S, S) for figures: the synthetic val split, or the first
    readable clips of data.val_shards (else train_shards), centre-cropped."""
    d = cfg.data
    if d.source == "synthetic":
        clips, _ = moving_shapes_split("val", d.synthetic_images, d.synthetic_classes, d.num_frames, d.img_size)
        return normalize_clips(clips[:max_clips])
    from .urls import expand_urls
    urls = expand_urls(d.val_shards or d.train_shards, "data.val_shards")
    counter = BadSampleCounter(d.max_bad_fraction, "video figure clips")
    out = []
    for url in urls:
        for raw in iter_video_shard(url, counter):
            try:
                clip = decode_clip(raw.data, d.num_frames, d.frame_stride, d.max_image_pixels)
            except Exception as e:  # untrusted bytes: a bad clip is skipped, as in training
                counter.record(raw.shard, raw.key, f"cannot decode clip: {type(e).__name__}: {str(e)[:160]}")
                continue
            C, T, H, W = clip.shape
            side = min(H, W)
            box = CropBox((W - side) // 2, (H - side) // 2, side, side)
            out.append(crop_resize_flip(clip.reshape(C * T, H, W), box, d.img_size, False).view(C, T, d.img_size, d.img_size))
            if len(out) == max_clips:
                return normalize_clips(torch.stack(out))
    if not out:
        raise DataError(f"no readable clip in {urls[0]} ... for the video figure")
    return normalize_clips(torch.stack(out))


# Synthetic video source ------------------------------------------------------------------------
def _augment_clips(clips: torch.Tensor, size: int, scale: tuple[float, float], hflip: bool,
                   gen: torch.Generator) -> torch.Tensor:
    """One RandomResizedCrop box and flip per clip, the same for all its frames."""
    B, C, T, H, W = clips.shape
    out = random_resized_crop_batch(clips.reshape(B, C * T, H, W), size, scale, hflip, gen)
    return out.view(B, C, T, size, size)


class SyntheticVideoTrainSource(IterableDataset):
    """Endless batches of the moving-shapes set for one rank, as SyntheticTrainSource: epoch e
    visits a permutation of the clips keyed on (seed, e); each batch holds B / R clips, each
    repeated R times (data.repeated_aug) with its own crop and flip."""

    def __init__(self, clips: torch.Tensor, labels: torch.Tensor, *, batch_size: int, repeats: int,
                 img_size: int, scale: tuple[float, float], hflip: bool, seed: int, rank: int,
                 world_size: int, num_roles: int, start: int, normalize_in_worker: bool) -> None:
        super().__init__()
        self.clips, self.labels = clips, labels
        self.batch_size, self.repeats, self.img_size = batch_size, repeats, img_size
        self.scale, self.hflip, self.seed = scale, hflip, seed
        self.rank, self.world_size, self.num_roles = rank, world_size, num_roles
        self.start, self.normalize_in_worker = start, normalize_in_worker
        self.per_batch = batch_size // repeats
        self.batches_per_epoch = len(clips) // (self.per_batch * world_size)

    def batch(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, b = divmod(j, self.batches_per_epoch)
        perm = torch.randperm(len(self.clips), generator=generator_for(self.seed, _TAG_VID_PERM, epoch))
        gb = b * self.world_size + self.rank
        idx = perm[gb * self.per_batch:(gb + 1) * self.per_batch].repeat_interleave(self.repeats)
        gen = generator_for(self.seed, _TAG_VID_AUG, epoch, gb)
        return _augment_clips(self.clips[idx], self.img_size, self.scale, self.hflip, gen), self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        j = self.start + _worker_id()
        while True:
            with single_thread():
                clips, labels = self.batch(j)
                if self.normalize_in_worker:
                    clips = normalize_clips(clips)
            yield clips, labels, {"j": j}
            j += self.num_roles


class SyntheticVideoSource(SyntheticSource):
    """The moving-shapes set; the position is (epoch, batch index), exact on resume."""

    normalize = staticmethod(normalize_clips)

    def __init__(self, cfg: Config, rank: int, world_size: int, num_roles: int) -> None:
        d = cfg.data
        self.cfg, self.rank, self.world_size, self.num_roles = cfg, rank, world_size, num_roles
        self.seed = cfg.engine.seed
        self._images, self._labels = moving_shapes_split(
            "train", d.synthetic_images, d.synthetic_classes, d.num_frames, d.img_size)
        self.batches_per_epoch = global_batches_per_epoch(
            len(self._images), d.batch_size // d.repeated_aug, world_size, "data.synthetic_images", "clips")
        self.placement = Placement(len(self._images), d.batch_size // d.repeated_aug, world_size, rank)

    def load_state_dict(self, sd: dict[str, Any]) -> int:
        batches, moved = self.placement.load_state_dict(sd)
        if not moved:
            return batches
        # The clip batches (repeated augmentation) are not re-split: resume at the epoch's share.
        self.placement.origin = (0, 0, 0)
        epoch, used = int(sd["epoch"]), int(sd.get("consumed", 0))
        warnings.warn("clip position saved with another rank count or batch size: resuming at the same "
                      "point of the epoch, not re-split exactly", stacklevel=3)
        return epoch * self.batches_per_epoch + min(used // (self.placement.b * self.world_size),
                                                    self.batches_per_epoch)

    def dataset(self, batches: int, *, gpu: bool, normalize_in_worker: bool) -> IterableDataset:
        d = self.cfg.data
        return SyntheticVideoTrainSource(
            self._images, self._labels, batch_size=d.batch_size, repeats=d.repeated_aug, img_size=d.img_size,
            scale=(d.crop_min_scale, 1.0), hflip=d.hflip, seed=self.seed, rank=self.rank,
            world_size=self.world_size, num_roles=self.num_roles, start=batches,
            normalize_in_worker=normalize_in_worker)


# Clip shards: reading --------------------------------------------------------------------------
def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the array bytes) of a .npy payload; C order only."""
    f = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(f)
    if major == 1:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif major in (2, 3):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy version {major}")
    if fortran:
        raise ValueError("frames array is in Fortran order, not C order")
    return tuple(shape), dtype, f.tell()


def decode_clip(data: bytes, num_frames: int, stride: int = 1, max_pixels: int = 64_000_000,
                gen: torch.Generator | None = None) -> torch.Tensor:
    """A KEY.frames.npy payload -> uint8 (3, num_frames, H, W): a window of num_frames frames
    every `stride`-th, its start drawn from `gen` (the first window without one). Raises
    ValueError with the reason for anything that is not such a clip."""
    shape, dtype, offset = _npy_header(data)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(f"frames array is {dtype} {shape}, not uint8 (T, H, W, 3)")
    T0, H, W, C = shape
    if H * W > max_pixels or T0 > MAX_CLIP_FRAMES or min(H, W) < 1:
        raise ValueError(f"frames array {shape} exceeds {MAX_CLIP_FRAMES} frames or data.max_image_pixels="
                         f"{max_pixels} per frame")
    # The header is untrusted: np.load would allocate whatever size it claims before reading a
    # byte, so the payload must hold exactly that many bytes and is viewed, never copied whole.
    count = T0 * H * W * C
    if len(data) - offset != count:
        raise ValueError(f"frames array {shape} needs {count} bytes after its header, the payload "
                         f"has {len(data) - offset}")
    need = (num_frames - 1) * stride + 1
    if T0 < need:
        raise ValueError(f"clip has {T0} frames, fewer than the {need} that data.num_frames={num_frames} "
                         f"at data.frame_stride={stride} need")
    arr = np.frombuffer(data, np.uint8, count, offset).reshape(shape)
    start = int(torch.randint(0, T0 - need + 1, (1,), generator=gen)) if gen is not None else 0
    window = arr[start:start + need:stride].copy()  # copies the window, not the clip
    clip = torch.from_numpy(window).permute(3, 0, 1, 2)
    return clip.expand(3, -1, -1, -1).contiguous() if clip.shape[0] == 1 else clip.contiguous()


def _finish_clip(key: str, parts: dict[str, bytes], shard: str, counter: BadSampleCounter,
                 labels: LabelPolicy) -> RawSample | None:
    if FRAMES_EXT not in parts:
        counter.record(shard, key, f"no .{FRAMES_EXT} member among {sorted(parts)}")
        return None
    label, why = labels.parse(parts.get("cls"), shard, key)
    if label is None:
        counter.record(shard, key, why)
        return None
    return RawSample(key, parts[FRAMES_EXT], label, shard)


def iter_video_shard(url: str, counter: BadSampleCounter, labels: LabelPolicy = _DEFAULT_LABELS
                     ) -> Iterator[RawSample]:
    """Clips of one shard in tar order, by tar.iter_shard's rules (a shard that breaks off is
    logged, counted as one bad sample, and ends early)."""
    return iter_shard(url, counter, labels, finish=_finish_clip, unit="clip")


class WdsVideoTrainSource(WdsTrainSource):
    """WdsTrainSource over clip shards: same shard order, shuffle buffer and resume positions;
    a sample is a clip, decoded into data.repeated_aug crops (one box and flip per crop, the
    same for all frames), so a batch holds batch_size / repeated_aug clips."""

    _read_shard = staticmethod(iter_video_shard)
    _normalize = staticmethod(normalize_clips)

    def __init__(self, urls, *, num_frames: int, frame_stride: int, repeats: int, **kw) -> None:
        super().__init__(urls, **kw)
        self.num_frames, self.frame_stride, self.repeats = num_frames, frame_stride, repeats
        self.batch_size = self.batch_size // repeats

    def _decode(self, raw: RawSample, gen: torch.Generator, counter: BadSampleCounter) -> Any:
        S = self.img_size
        try:
            clip = decode_clip(raw.data, self.num_frames, self.frame_stride, self.max_pixels, gen)
            C, T, H, W = clip.shape
            flat = clip.reshape(C * T, H, W)
            crops = []
            for _ in range(self.repeats):
                crops.append(random_resized_crop_tensor(flat, S, self.scale, hflip=self.hflip, gen=gen)
                             .view(C, T, S, S))
            return torch.stack(crops)
        except Exception as e:  # untrusted bytes: any decoder failure means a bad sample
            counter.record(raw.shard, raw.key, f"cannot decode clip: {type(e).__name__}: {str(e)[:160]}")
            return None

    def _collate(self, items: list[Any], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        lab = torch.tensor(labels, dtype=torch.int64).repeat_interleave(self.repeats)
        return torch.cat(items), lab


class WdsVideoSource(WdsSource):
    """Clip shards (data.source='wds-video'); positions and resume as WdsSource's."""

    gpu_decode: ClassVar[bool] = False
    normalize = staticmethod(normalize_clips)
    read_shard = staticmethod(iter_video_shard)

    def dataset(self, batches: int, *, gpu: bool, normalize_in_worker: bool) -> IterableDataset:
        d = self.cfg.data
        return WdsVideoTrainSource(
            self.urls, num_frames=d.num_frames, frame_stride=d.frame_stride, repeats=d.repeated_aug,
            img_size=d.img_size, batch_size=d.batch_size, scale=(d.crop_min_scale, 1.0), hflip=d.hflip,
            shuffle_buffer=d.shuffle_buffer, max_bad_fraction=d.max_bad_fraction, seed=self.seed,
            rank=self.rank, world_size=self.world_size, num_roles=self.num_roles,
            rotation=batches % self.num_roles, starts=list(self._starts), resampled=d.resampled,
            resample_key=self._resample_key, gpu=False, normalize_in_worker=normalize_in_worker,
            labels=LabelPolicy(False, d.num_classes), max_pixels=d.max_image_pixels, layout=self._layout)


# Clip shards: writing --------------------------------------------------------------------------
def natural_key(name: str) -> tuple:
    """Sort key comparing runs of digits by value: f2 before f10 (frame dumps rarely pad)."""
    parts = re.split(r"(\d+)", name)
    # Odd positions are digit runs; the text breaks ties between equal values (f01 vs f1).
    return tuple((int(p), p) if i % 2 else p for i, p in enumerate(parts))


def _frames_of(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
                  key=lambda p: natural_key(p.name))


def list_clip_folders(src: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(clip folder, class index or -1)]): SRC/<clip>/<frames> gives unlabelled
    clips, SRC/<class>/<clip>/<frames> labelled ones (class index = sorted folder order)."""
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected SRC/<clip>/<frame> files)")
    tops = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    labelled = bool(tops) and not any(_frames_of(t) for t in tops)
    classes: list[str] = []
    items: list[tuple[Path, int]] = []
    if labelled:
        classes = [t.name for t in tops]
        for ci, t in enumerate(tops):
            items += [(c, ci) for c in sorted(p for p in t.iterdir() if p.is_dir() and not p.name.startswith("."))]
    else:
        items = [(t, -1) for t in tops]
    if not items:
        raise FileNotFoundError(f"{root}: no clip folders (SRC/<clip>/<frame> or SRC/<class>/<clip>/<frame>)")
    return classes, items


def _read_clip(folder: Path) -> np.ndarray:
    from PIL import Image

    from .transforms import to_rgb
    frames = []
    for f in _frames_of(folder):
        with Image.open(f) as img:
            img.load()
            frames.append(np.asarray(to_rgb(img), dtype=np.uint8))
    if not frames:
        raise ValueError("no frame files")
    if len({fr.shape for fr in frames}) != 1:
        raise ValueError(f"frames of different sizes {sorted({fr.shape for fr in frames})}")
    return np.stack(frames)


class ClipKeyClash(DataError):
    """Two clip folders whose names map to one shard key (their samples would merge)."""


def _keyed(folders: list[tuple[Path, int]], root: Path) -> list[tuple[Path, int, str]]:
    # The reader splits a member name at the first '.', so a key keeps only [alnum _ -].
    seen: dict[str, Path] = {}
    out = []
    for folder, ci in folders:
        rel = "_".join(folder.relative_to(root).parts)
        key = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in rel)
        if key in seen:
            raise ClipKeyClash(f"write-video-shards: clip folders {seen[key]} and {folder} both map to the "
                               f"sample key {key!r}; rename one of them")
        seen[key] = folder
        out.append((folder, ci, key))
    return out


def write_video_shards(src: str | os.PathLike, out_pattern: str, max_count: int = 200, seed: int | None = 0,
                       gzip: bool = False) -> list[str]:
    """Shards `out_pattern % i` of at most `max_count` clips (KEY.frames.npy [+ KEY.cls]);
    byte-reproducible, each written under a temporary name and renamed when complete (removed
    on failure); a clip folder that cannot be read is logged and left out; two folders mapping
    to one key are a ClipKeyClash before anything is written. Returns the shard paths."""
    check_out_pattern(out_pattern, max_count, "out/clips-%06d.tar")
    root = Path(src)
    classes, folders = list_clip_folders(root)
    items = _keyed(folders, root)
    if seed is not None:
        random.Random(seed).shuffle(items)
    first = Path(out_pattern % 0)
    first.parent.mkdir(parents=True, exist_ok=True)
    if classes:
        (first.parent / "classes.tsv").write_text("".join(f"{i}\t{c}\n" for i, c in enumerate(classes)))

    def members(item: tuple[Path, int, str]) -> list[tuple[str, bytes]]:
        folder, ci, key = item
        buf = io.BytesIO()
        np.save(buf, _read_clip(folder), allow_pickle=False)
        out = [(f"{key}.{FRAMES_EXT}", buf.getvalue())]
        return out + ([(f"{key}.cls", str(ci).encode())] if ci >= 0 else [])

    paths, _ = write_tar_shards(items, out_pattern, max_count, gzip or out_pattern.endswith(".gz"), members,
                                "write-video-shards")
    return paths


__all__ = ["FRAMES_EXT", "SyntheticVideoSource", "SyntheticVideoTrainSource", "WdsVideoSource",
           "WdsVideoTrainSource", "decode_clip", "iter_video_shard",
           "list_clip_folders", "make_moving_shapes", "moving_shapes_split", "normalize_clips",
           "video_eval_clips", "write_video_shards"]
