"""What a split holds, found without decoding it: its class count and its sample count.

- Classes: the `classes.tsv` that `ldae-fast make-shards` (and write-video-shards) writes beside
  the shards, one line per class; only a split without one is scanned.
- Samples (the probe's and the fine-tune's epoch length when nothing else gives it): a walk over
  the tar headers of every shard, reading only the few bytes of each .cls member. A local
  uncompressed shard is walked by seeking past every image, so an ImageNet-sized split costs
  headers, not its 140 GB; a compressed or `pipe:` shard has no seek and is read through.

Any scan runs on rank 0 alone and its answer goes to every rank (`on_rank0`).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Callable, Optional, TypeVar

from ldae_fast.data.badsamples import BadSampleCounter
from ldae_fast.data.imagenet_layout import LayoutError, read_classes
from ldae_fast.data.tar import IMAGE_EXTS, LabelPolicy, _split_name
from ldae_fast.data.urls import local_path, url_kind

from . import dist as edist

T = TypeVar("T")

CLASSES_FILE = "classes.tsv"


def classes_beside(urls) -> int:
    """The number of classes in the classes.tsv beside the (local) shards `urls`, 0 when there is
    none (or the shards are not local files, or they lie in several folders)."""
    if not urls or any(url_kind(u) != "local" for u in urls):
        return 0
    dirs = {Path(local_path(u)).parent for u in urls}
    if len(dirs) != 1:
        return 0
    f = dirs.pop() / CLASSES_FILE
    if not f.is_file():
        return 0
    try:
        return len(read_classes(f))
    except LayoutError:
        return 0


def _plain_local(url: str) -> Optional[Path]:
    """The path of a local, uncompressed tar (seekable headers), else None."""
    if url_kind(url) != "local":
        return None
    p = Path(local_path(url))
    try:
        with open(p, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return None
    return p


def _header_samples(path: Path, labels: LabelPolicy):
    """The labels of the samples (an image and a readable label) of one plain tar, in tar order,
    from its headers and .cls members only."""
    key, exts, label = None, set(), None
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            split = _split_name(m.name)
            if split is None:
                continue
            mkey, ext = split
            if mkey != key:
                if key is not None and label is not None and exts & set(IMAGE_EXTS):
                    yield label
                key, exts, label = mkey, set(), None
            exts.add(ext)
            if ext == "cls":
                label, _why = labels.parse(tf.extractfile(m).read(64), str(path), mkey)
        if key is not None and label is not None and exts & set(IMAGE_EXTS):
            yield label


def scan_labels(spec) -> tuple[int, int]:
    """(samples with an image and a label, 1 + the largest label) of `spec`'s split, capped by
    its max_images: tar headers and .cls members of local uncompressed image shards, the whole
    shard through the reader otherwise (compressed, piped, clip shards, or a tar the header walk
    cannot read)."""
    from .stream import _shard_reader

    policy = LabelPolicy(True, spec.num_classes)
    counter = BadSampleCounter(1.0, spec.what)
    cap = spec.max_images if spec.max_images is not None else float("inf")
    n, top = 0, -1
    for url in spec.urls:
        path = None if spec.clip_frames else _plain_local(url)
        if path is not None:
            try:
                got = list(_header_samples(path, policy))
            except (tarfile.TarError, OSError, EOFError):
                got = None
        else:
            got = None
        if got is None:
            got = [raw.label for raw in _shard_reader(spec)(url, counter, policy)]
        for lab in got:
            n += 1
            top = max(top, lab)
            if n >= cap:
                return n, top + 1
    return n, top + 1


def on_rank0(fn: Callable[[], T]) -> T:
    """fn() on rank 0, its result on every rank."""
    res = fn() if edist.current().main else None
    return edist.all_gather_objects(res)[0]


__all__ = ["CLASSES_FILE", "classes_beside", "scan_labels", "on_rank0"]
