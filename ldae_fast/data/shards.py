"""Shard writer: an ImageFolder tree -> WebDataset tar shards in the ImageNet layout.

`SRC/<class>/<image>` becomes `KEY.jpg` + `KEY.cls`, the class index being the position of the
class folder name in sorted order (torchvision's ImageFolder rule). JPEG files are stored with
their original bytes (no generation loss, whatever their colour mode: the reader converts
grayscale and CMYK); other formats are re-encoded as RGB JPEG (quality 95, transparency
composited on white). Shards are reproducible byte for byte: fixed member metadata and gzip
header time, a seeded sample order. Each shard is written to a temporary name and renamed when
complete, so an interrupted run never leaves a truncated shard under a final name.
`classes.tsv` (index TAB class name) is written beside the shards.

CLI: `ldae-fast make-shards SRC OUT_PATTERN [--maxcount N] [--gzip] [--seed S]`.
"""

from __future__ import annotations

import contextlib
import gzip as gzip_mod
import io
import logging
import os
import random
import re
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from PIL import Image

log = logging.getLogger("ldae_fast.data")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
DEFAULT_MAXCOUNT = 2000


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _to_jpeg(path: Path) -> bytes:
    from .transforms import to_rgb  # imports torch: not needed for --help

    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(img)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def list_image_folder(src: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class names and (file, class index) pairs of an ImageFolder tree."""
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected SRC/<class>/<image> files)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root} has no class subfolders (expected SRC/<class>/<image> files)")
    items: list[tuple[Path, int]] = []
    for ci, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for fn in sorted(filenames):
                if Path(fn).suffix.lower() in IMAGE_SUFFIXES and not fn.startswith("."):
                    items.append((Path(dirpath) / fn, ci))
    if not items:
        raise FileNotFoundError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in class folders")
    return classes, items


def _key_for(path: Path, root: Path) -> str:
    # The reader splits a member name at the first '.' of its file name, so the key keeps no dot.
    rel = path.relative_to(root).with_suffix("")
    return re.sub(r"[^A-Za-z0-9_\-]", "_", "_".join(rel.parts))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


T = TypeVar("T")


def check_out_pattern(out_pattern: str, max_count: int, example: str) -> None:
    if max_count < 1:
        raise ValueError(f"max_count={max_count} must be >= 1")
    try:
        out_pattern % 0
    except TypeError:
        raise ValueError(f"out_pattern {out_pattern!r} needs a %d-style field for the shard number, "
                         f"e.g. {example!r}") from None


def write_tar_shards(items: Sequence[T], out_pattern: str, max_count: int, gz: bool,
                     members: Callable[[T], list[tuple[str, bytes]]], tool: str,
                     progress: Callable[[int, int, int], None] | None = None) -> tuple[list[str], int]:
    """Shards `out_pattern % i` of at most `max_count` items, each item the tar members
    `members(item)` returns; returns (shard paths, items left out). An item whose `members`
    raises is logged and left out, not fatal. Byte-reproducible (fixed member headers, gzip with
    mtime 0 and no name; pax format, which writes no extended header for short ASCII names, so
    those shards are plain ustar); each shard is written under a temporary name, renamed when
    complete and removed on any failure. `progress(done, total, shard_index)` after each item."""
    paths: list[str] = []
    pos = shard_i = skipped = 0
    while pos < len(items):
        name = out_pattern % shard_i
        if gz and not name.endswith(".gz"):
            name += ".gz"
        tmp = f"{name}.tmp{os.getpid()}"
        count = 0
        try:
            with open(tmp, "wb") as raw:
                fobj = gzip_mod.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if gz else raw
                try:
                    with tarfile.open(fileobj=fobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
                        while count < max_count and pos < len(items):
                            item = items[pos]
                            pos += 1
                            try:
                                parts = members(item)
                            except Exception as e:  # one unreadable source is left out, not fatal
                                skipped += 1
                                log.warning("%s: leaving out %s: %s", tool, item[0] if isinstance(item, tuple) else item, e)
                                parts = None
                            if parts is not None:
                                for member, data in parts:
                                    _add(tar, member, data)
                                count += 1
                            if progress is not None:
                                progress(pos, len(items), shard_i)
                finally:
                    if fobj is not raw:
                        fobj.close()
        except BaseException:
            with contextlib.suppress(OSError):  # a half-written shard must not stay behind
                os.remove(tmp)
            raise
        if count == 0:  # everything left was unreadable: no empty shard
            os.remove(tmp)
            break
        os.replace(tmp, name)
        paths.append(name)
        shard_i += 1
    if skipped:
        log.warning("%s: %d unreadable source(s) left out", tool, skipped)
    return paths, skipped


def write_shards(
    src: str | os.PathLike,
    out_pattern: str,
    max_count: int = DEFAULT_MAXCOUNT,
    seed: int | None = 0,
    gzip: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
    val_labels: str | os.PathLike | None = None,
    classes_from: str | os.PathLike | None = None,
) -> list[str]:
    """Write shards `out_pattern % i` (e.g. "out/train-%06d.tar") of at most `max_count`
    samples each; returns their paths. `seed` None keeps the sorted (class, file) order, else
    samples are shuffled with it so each shard mixes classes. `gzip` (or a pattern ending in
    .gz) compresses; ".gz" is appended to names that lack it. Unreadable source files are
    logged and left out. `progress(done, total, shard_index)` is called after each sample.
    With `val_labels`, SRC is one flat folder labelled by that file and `classes_from` (a
    classes.tsv or the train folder) gives the index (imagenet_layout.py: ImageNet's val)."""
    check_out_pattern(out_pattern, max_count, "out/train-%06d.tar")
    root = Path(src)
    if val_labels is not None:
        from .imagenet_layout import list_flat_folder, read_classes

        if classes_from is None:
            raise ValueError("a flat folder with --val-labels needs --classes (the classes.tsv beside "
                             "the train shards, or the train folder)")
        classes = read_classes(classes_from)
        items = list_flat_folder(root, val_labels, classes, IMAGE_SUFFIXES)
    else:
        classes, items = list_image_folder(root)
    if seed is not None:
        random.Random(seed).shuffle(items)
    first = Path(out_pattern % 0)
    first.parent.mkdir(parents=True, exist_ok=True)
    (first.parent / "classes.tsv").write_text("".join(f"{i}\t{c}\n" for i, c in enumerate(classes)))
    used: set[str] = set()

    def members(item: tuple[Path, int]) -> list[tuple[str, bytes]]:
        path, ci = item
        data = path.read_bytes()
        if not _is_jpeg(data):
            data = _to_jpeg(path)
        # Keys of readable files only, so a left-out file takes no suffix from the next one.
        key = base = _key_for(path, root)
        n = 1
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        return [(f"{key}.jpg", data), (f"{key}.cls", str(ci).encode("ascii"))]

    paths, _ = write_tar_shards(items, out_pattern, max_count, gzip or out_pattern.endswith(".gz"), members,
                                "make-shards", progress)
    return paths


def main(argv: list[str] | None = None) -> int:
    """`ldae-fast make-shards SRC OUT_PATTERN [--maxcount N] [--gzip] [--seed S]`."""
    from ..errors import run_cli

    return run_cli(_main, argv, "ldae-fast make-shards")


def _main(argv: list[str]) -> int:
    from ..errors import ArgParser, UsageError

    ap = ArgParser(
        prog="ldae-fast make-shards",
        description="Write WebDataset shards (KEY.jpg + KEY.cls) from an ImageFolder tree "
                    "SRC/<class>/<image>; class index = sorted folder order; classes.tsv beside.")
    ap.add_argument("src", help="root folder with one subfolder per class")
    ap.add_argument("out_pattern", help="shard names with a %%d field, e.g. shards/train-%%06d.tar")
    ap.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT, help="samples per shard")
    ap.add_argument("--gzip", action="store_true", help="gzip the shards (.tar.gz)")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed (-1: keep sorted order)")
    ap.add_argument("--val-labels", default=None,
                    help="SRC is one flat folder (ImageNet's val) labelled by the devkit folder "
                         "(ILSVRC2012_devkit_t12: ground truth + meta.mat) or a file of one line per "
                         "image: FILENAME,SYNSET (e.g. LOC_val_solution.csv) or FILENAME INDEX")
    ap.add_argument("--classes", default=None,
                    help="with --val-labels: the class list (the classes.tsv written beside the train "
                         "shards, or the train folder); default: classes.tsv beside OUT_PATTERN")
    args = ap.parse_args(argv)
    classes_from = args.classes
    if args.val_labels and classes_from is None:
        beside = Path(args.out_pattern).parent / "classes.tsv"
        if not beside.is_file():
            raise UsageError(f"--val-labels needs --classes: no {beside} (write the train shards there "
                             "first, or pass --classes TRAIN_FOLDER)")
        classes_from = str(beside)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    tty = sys.stderr.isatty()
    last = [0.0]

    def progress(done: int, total: int, shard: int) -> None:
        now = time.time()
        if done == total or now - last[0] > (0.2 if tty else 10.0):
            last[0] = now
            rate = done / max(now - t0, 1e-9)
            line = f"make-shards: {done}/{total} images, shard {shard}, {rate:.0f} img/s"
            print(("\r" + line) if tty else line, end="" if tty and done < total else "\n",
                  file=sys.stderr, flush=True)

    try:
        paths = write_shards(args.src, args.out_pattern, max_count=args.maxcount,
                             seed=None if args.seed < 0 else args.seed, gzip=args.gzip, progress=progress,
                             val_labels=args.val_labels, classes_from=classes_from)
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(f"make-shards: wrote {len(paths)} shard(s) in {time.time() - t0:.1f}s: "
          f"{paths[0] if paths else ''} ... (classes.tsv beside them)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
