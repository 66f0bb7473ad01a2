"""Evaluation arrays: whole labelled splits as tensors, decoded deterministically (no augmentation)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from .badsamples import BadSampleCounter, DataError
from .synthetic import synthetic_split
from .tar import LabelPolicy, RawSample, iter_shard
from .transforms import eval_transform, normalize, single_thread
from .urls import expand_urls

if TYPE_CHECKING:
    from ..config import Config


def build_eval_arrays(cfg: Config, split: str, max_images: int | None = None, labels: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (images float32 (M,3,S,S) normalised, labels int64 (M,)), no augmentation.
    `labels` False: images alone are wanted (a figure), so a sample without .cls is no error
    (its label is -1).

    'synthetic': the train split or the disjoint val split of the built-in set. 'wds': the
    first `max_images` readable samples of data.train_shards / data.val_shards, in shard order
    and tar order, resized + centre-cropped (transforms.eval_resize_size). Memory: 12*S*S bytes
    per image, so cap `max_images` for ImageNet-sized sets.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: choose 'train' or 'val'")
    d = cfg.data
    if max_images == 0:
        return torch.empty(0, 3, d.img_size, d.img_size), torch.empty(0, dtype=torch.int64)
    if d.source == "synthetic":
        imgs, labels = synthetic_split(split, d.synthetic_images, d.synthetic_classes, d.img_size,
                                       kind=d.synthetic_kind)
        if max_images is not None:
            imgs, labels = imgs[:max_images], labels[:max_images]
        with single_thread():
            return normalize(imgs), labels.clone()
    what = "data.train_shards" if split == "train" else "data.val_shards"
    urls = expand_urls(d.train_shards if split == "train" else d.val_shards, what)
    counter = BadSampleCounter(d.max_bad_fraction, what)
    limit = max_images if max_images is not None else float("inf")
    out: list[torch.Tensor] = []
    labels_out: list[int] = []

    def decode(raw: RawSample) -> torch.Tensor | Exception:
        try:
            return eval_transform(raw.data, d.img_size, max_pixels=d.max_image_pixels)
        except Exception as e:  # untrusted bytes: any decoder failure means a bad sample;
            return e  # returned, not raised, so the caller reports it in sample order

    def consume(chunk: list[RawSample], pool: ThreadPoolExecutor) -> None:
        for raw, img in zip(chunk, pool.map(decode, chunk)):
            if len(out) >= limit:
                return
            if isinstance(img, Exception):
                counter.record(raw.shard, raw.key, f"cannot decode image: {type(img).__name__}: {str(img)[:160]}")
                continue
            counter.ok()
            out.append(img)
            labels_out.append(raw.label)

    # PIL releases the GIL while decoding, so threads give parallel decode with the order kept.
    with ThreadPoolExecutor(max_workers=max(1, d.num_workers)) as pool:
        chunk: list[RawSample] = []
        for url in urls:
            for raw in iter_shard(url, counter, LabelPolicy(labels, d.num_classes)):
                chunk.append(raw)
                if len(chunk) >= 256:
                    consume(chunk, pool)
                    chunk = []
                if len(out) >= limit:
                    break
            if len(out) >= limit:
                break
        if chunk and len(out) < limit:
            consume(chunk, pool)
    if not out:
        raise DataError(f"{what}: no readable sample in {len(urls)} shard(s)")
    with single_thread():
        return normalize(torch.stack(out)), torch.tensor(labels_out, dtype=torch.int64)


def read_raw_labels(url: str) -> list[tuple[str, int]]:
    """(key, label) of every complete sample of a shard, in tar order (checks and tools)."""
    counter = BadSampleCounter(1.0, url)
    return [(s.key, s.label) for s in iter_shard(url, counter)]


__all__ = ["build_eval_arrays", "read_raw_labels"]
