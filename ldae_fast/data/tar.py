"""The streaming tar reader: tar members grouped into samples, labels parsed, bad data counted.

Shards are tar files (plain or gzipped) whose members come in groups sharing a key:
`KEY.jpg` (or .jpeg/.png/.webp) and `KEY.cls` (the class index in ASCII).
The reader is our own streaming tar reader rather than the `webdataset` package's pipeline,
because exact resume and per-sample bad-data accounting need control over every stage.

Labels: `.cls` is optional for pretraining (a sample without one gets label -1); evaluation
needs one per sample and stops with a DataError naming shard and key. A label that is not a
plain decimal integer, is negative, does not fit 31 bits, or is >= data.num_classes (when set)
is a bad sample.

Bad data: a sample whose image does not decode, is larger than data.max_image_pixels (checked
from its header, before decoding), whose .cls is unreadable, or whose image member is missing
is counted, logged with shard and key, and skipped. A tar member whose header claims more bytes
than the shard holds (or than MAX_MEMBER_BYTES) makes the shard broken. A shard that cannot
be opened or stops mid-way (truncated tar or gzip, failed pipe command) is logged with the shard
name and how far it got, counts as one bad sample, and reading goes on with the next shard: a
single cut-off download must not kill a long run, and the fraction limit still stops a run
whose shards are mostly broken. Past data.max_bad_fraction of bad samples (after the first 100,
counted per reader process) the stream raises `DataError`. A slot whose shards yield no sample
at all for two passes raises too, instead of spinning forever. (Image decoding and the limit
are the callers': sources.py, eval_arrays.py, resident.py, with badsamples.BadSampleCounter.)
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .badsamples import BadSampleCounter, DataError
from .urls import open_url

log = logging.getLogger("ldae_fast.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    key: str
    data: bytes
    label: int
    shard: str


class TarFormatError(OSError):
    """A tar stream is cut off or its headers are damaged."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


# No image member is this large; a header claiming more is damaged (or hostile).
MAX_MEMBER_BYTES = 1 << 31
_CHUNK = 1 << 24


def _read_exact(f: Any, n: int) -> bytes:
    # In bounded chunks: a header that claims more than the stream holds must end in a clear
    # error at the stream's end, not in one giant allocation.
    parts, got = [], 0
    while got < n:
        more = f.read(min(_CHUNK, n - got))
        if not more:
            raise TarFormatError(f"unexpected end of data ({got} of {n} bytes of a member)")
        parts.append(more)
        got += len(more)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _remaining(f: Any) -> int | None:
    """Bytes left in a plain local file (None for a pipe or a decompressed stream)."""
    try:
        return os.fstat(f.fileno()).st_size - f.tell()
    except (AttributeError, OSError, ValueError):
        return None


def _decompressed(f: Any) -> Any:
    """Wrap a binary stream in its decompressor, chosen by magic bytes (gzip, bzip2, xz)."""
    head = f.peek(6)[:6] if hasattr(f, "peek") else b""
    if head[:2] == b"\x1f\x8b":
        import gzip

        return gzip.GzipFile(fileobj=f, mode="rb")
    if head[:3] == b"BZh":
        import bz2

        return bz2.BZ2File(f, mode="rb")
    if head[:6] == b"\xfd7zXZ\x00":
        import lzma

        return lzma.LZMAFile(f, mode="rb")
    return f


def iter_tar(f: Any) -> Iterator[tuple[str, bytes]]:
    """(name, content) of the regular files of a tar stream, in order.

    A small reader of its own instead of `tarfile`: an order of magnitude less Python per member
    (it matters for small images, where tar parsing costs as much as JPEG decoding), and a cut
    or damaged stream always raises `TarFormatError` instead of ending quietly, also when it
    is cut exactly between members (no end-of-archive marker). Handles ustar
    prefixes, GNU long names and pax path/size records, which is what tar writers produce.
    """
    raw = f
    f = _decompressed(f)
    plain = f is raw
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = f.read(512)
        if len(header) < 512:
            if not header:
                # Every tar writer ends with zero blocks; a stream cut at a block boundary
                # (a partial copy in MB chunks) would otherwise look complete.
                raise TarFormatError("stream ends without the end-of-archive marker (truncated)")
            header += _read_exact(f, 512 - len(header))
        if header == b"\0" * 512:
            return
        want = _octal(header[148:156])
        if sum(header[:148]) + 256 + sum(header[156:]) != want:
            raise TarFormatError("damaged tar header (checksum mismatch)")
        try:
            size = int(pax.get("size", _octal(header[124:136])))
        except ValueError:
            raise TarFormatError("damaged tar header (unreadable member size)") from None
        left = _remaining(f) if plain else None
        if size < 0 or size > MAX_MEMBER_BYTES or (left is not None and size > left):
            room = f"{left} bytes left in the shard" if left is not None and size > left else \
                f"the {MAX_MEMBER_BYTES} a member may have"
            raise TarFormatError(f"a member header claims {size} bytes, more than {room} (damaged or "
                                 f"hostile shard)")
        kind = header[156:157]
        data = _read_exact(f, size) if size else b""
        pad = -size % 512
        if pad:
            _read_exact(f, pad)
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if kind in (b"x", b"g"):
            if kind == b"x":
                pax = _parse_pax(data)
            continue
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{name}"
        name = pax.get("path", long_name or name)
        long_name, pax = None, {}
        if kind in (b"0", b"\0", b"7"):
            yield name, data


def _parse_pax(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        length = int(data[pos:sp])
        rec = data[sp + 1 : pos + length - 1].decode("utf-8", "replace")
        k, _, v = rec.partition("=")
        out[k] = v
        pos += length
    return out


def _split_name(name: str) -> tuple[str, str] | None:
    """WebDataset convention: the key is the path up to the first '.' of the file name."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{d}/{stem}" if d else stem), ext.lower()


_LABEL_RE = re.compile(r"[0-9]+")
MAX_LABEL = 2**31 - 1
NO_LABEL = -1


class LabelPolicy:
    """What a sample's .cls must be: `required` (evaluation) or optional (pretraining: a
    missing label is NO_LABEL), and below `num_classes` when that is known (> 0)."""

    def __init__(self, required: bool = False, num_classes: int = 0) -> None:
        self.required, self.num_classes = required, num_classes

    def parse(self, raw: bytes | None, shard: str, key: str) -> tuple[int | None, str]:
        """(label, '') or (None, why it is bad)."""
        if raw is None:
            if self.required:
                raise DataError(f"shard {shard} key {key!r} has no .cls label: evaluation (linear probe, "
                                "kNN, fine-tuning) needs a label per sample; pretraining does not")
            return NO_LABEL, ""
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return None, f"unreadable .cls content {raw[:20]!r}"
        if not _LABEL_RE.fullmatch(text):
            what = "negative" if re.fullmatch(r"-[0-9]+", text) else "not a non-negative integer"
            return None, f".cls {text[:24]!r} is {what}"
        label = int(text) if len(text) <= 10 else MAX_LABEL + 1
        if label > MAX_LABEL:
            return None, f".cls {text!r} is too large (labels are below 2^31)"
        if self.num_classes and label >= self.num_classes:
            return None, f".cls {label} is >= data.num_classes={self.num_classes}"
        return label, ""


_DEFAULT_LABELS = LabelPolicy()


def _finish_group(key: str, parts: dict[str, bytes], shard: str, counter: BadSampleCounter,
                  labels: LabelPolicy = _DEFAULT_LABELS) -> RawSample | None:
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if img_ext is None:
        counter.record(shard, key, f"no image member (.jpg) among {sorted(parts)}")
        return None
    label, why = labels.parse(parts.get("cls"), shard, key)
    if label is None:
        counter.record(shard, key, why)
        return None
    return RawSample(key, parts[img_ext], label, shard)


def iter_shard(url: str, counter: BadSampleCounter, labels: LabelPolicy = _DEFAULT_LABELS,
               finish: Callable[..., RawSample | None] | None = None, unit: str = "sample") -> Iterator[RawSample]:
    """Samples of one shard in tar order. A shard that breaks off is logged, counted as one bad
    sample, and ends early (the partial sample at the break is dropped). `finish(key, parts,
    shard, counter, labels)` turns one key's members into a sample or None (a bad one, counted):
    an image's by default; `unit` names what a sample is in the log."""
    finish = _finish_group if finish is None else finish
    key: str | None = None
    parts: dict[str, bytes] = {}
    n = 0
    try:
        with open_url(url) as f:
            for name, data in iter_tar(f):
                split = _split_name(name)
                if split is None:
                    continue
                mkey, ext = split
                if mkey != key:
                    if key is not None:
                        s = finish(key, parts, url, counter, labels)
                        if s is not None:
                            n += 1
                            yield s
                    key, parts = mkey, {}
                parts[ext] = data
            if key is not None:
                s = finish(key, parts, url, counter, labels)
                key = None
                if s is not None:
                    n += 1
                    yield s
    except (OSError, EOFError, ValueError, zlib.error) as e:
        log.error("shard %s is unreadable or truncated after %d %s(s) (at key %r): %s; "
                  "going on with the next shard", url, n, unit, key, e)
        counter.record(url, key or "-", f"shard broke off after {n} {unit}s: {e}")


__all__ = ["RawSample", "TarFormatError", "iter_tar", "LabelPolicy", "iter_shard", "IMAGE_EXTS",
           "MAX_MEMBER_BYTES", "MAX_LABEL", "NO_LABEL"]
