"""WebDataset shards (ImageNet layout) and the training stream the trainer iterates.

Shards are tar files (plain or gzipped) whose members come in groups sharing a key:
`KEY.jpg` (or .jpeg/.png/.webp) and `KEY.cls` (the class index in ASCII). URLs: local paths,
`file:PATH`, brace patterns (`train-{000000..000146}.tar`), several patterns joined by `::`,
`pipe:COMMAND ARGS` (one command, split like a shell would split it but run without a shell, so
no pipes or redirections; it writes the shard to stdout) and http(s) URLs (read by `curl`, the
URL passed as one argument). Configs stored in checkpoints or exports never bring a pipe: or
remote URL into effect (see config.sanitize_stored_config).
The reader is our own streaming tar reader rather than the `webdataset` package's pipeline,
because exact resume and per-sample bad-data accounting need control over every stage.

Reading (`TrainStream` with source 'wds'): ranks x workers = S "slots"; slot s = rank * W +
worker. Without resampling, epoch e permutes the shard list with a seed keyed on (seed, e) (the
same on every rank) and slot s reads shards perm[s::S] in that order, so ranks and workers read
disjoint shards and S may not exceed the number of shards. Samples pass through a shuffle
buffer of raw bytes (data.shuffle_buffer) that is emptied at the end of each epoch of a slot,
then are decoded with PIL, cropped and flipped (each sample's generator keyed on (seed, epoch,
slot, index in epoch)) and batched in the worker. With `resampled`, each slot instead draws
shards with replacement from its own seeded generator, forever.

Resume rule (`TrainStream.state_dict`): the position is the number of batches handed out, plus,
for 'wds', each worker's (epoch, samples out of the shuffle buffer in that epoch) after the last
of its batches that was handed out.
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
at all for two passes raises too, instead of spinning forever.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shlex
import signal
import subprocess
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .badsamples import BadSampleCounter, DataError
from .synthetic import synthetic_split
from .transforms import (
    CropBox,
    crop_resize_flip,
    crop_resize_flip_batch,
    decode_jpegs,
    eval_transform,
    generator_for,
    gpu_decode_available,
    mix_seed,
    normalize,
    open_image,
    sample_crop_box,
    sample_flip,
    single_thread,
    train_transform,
)

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("ldae_fast.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Domain tags for `generator_for` / `mix_seed`, so no two random streams share a key.
_TAG_SHARD_ORDER = 11
_TAG_BUFFER = 12
_TAG_AUG = 13
_TAG_RESAMPLE = 14
_TAG_SYN_PERM = 21
_TAG_SYN_AUG = 22


# URLs ------------------------------------------------------------------------------------------
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def brace_expand(pattern: str) -> list[str]:
    """Shell-style brace expansion: `{000..012}` (zero padding kept) and `{a,b,c}`."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = _RANGE.fullmatch(body)
    if rng:
        a_s, b_s = rng.groups()
        a, b = int(a_s), int(b_s)
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-")[0] == "0" for x in (a_s, b_s))
        width = max(len(a_s), len(b_s)) if padded else 0
        items = [str(i).zfill(width) for i in range(a, b + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"cannot expand {{{body}}} in shard pattern {pattern!r}: "
                        f"use {{A..B}} (numbers) or {{x,y,z}}")
    out: list[str] = []
    for item in items:
        out.extend(brace_expand(pattern[: m.start()] + item + pattern[m.end():]))
    return out


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def _local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def expand_urls(pattern: str, what: str = "data.train_shards", check_exists: bool = True) -> list[str]:
    """Shard URLs of a pattern (`::` separates patterns); clear errors for an empty pattern, an
    expansion to nothing, and missing local files (all named, with the pattern)."""
    parts = [p.strip() for p in pattern.split("::") if p.strip()]
    if not parts:
        raise DataError(f"{what} is empty: give shard paths such as "
                        f"'data/train-{{000000..000009}}.tar' (write them with `ldae-fast make-shards`)")
    urls: list[str] = []
    for part in parts:
        got = brace_expand(part)
        if not got:
            raise DataError(f"{what}={pattern!r}: {part!r} expands to no shard (is a range reversed?)")
        urls.extend(got)
    for url in urls:
        if "://" in url and not url.startswith(("http://", "https://")):
            raise DataError(f"{what}: cannot open {url!r}; use a local path, http(s):// or "
                            f"'pipe:COMMAND' (e.g. 'pipe:aws s3 cp {url} -')")
    if check_exists:
        missing = [u for u in urls if _is_local(u) and not os.path.isfile(_local_path(u))]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DataError(f"{what}={pattern!r}: {len(missing)} of {len(urls)} shard file(s) "
                            f"not found: {shown} (relative paths are taken from {os.getcwd()})")
    return urls


# Tar reading -----------------------------------------------------------------------------------
@dataclass
class RawSample:
    key: str
    data: bytes
    label: int
    shard: str


def command_of(url: str) -> list[str]:
    """The argv a remote or pipe: URL is read with; never a shell command line."""
    if url.startswith(("http://", "https://")):
        # "--" ends curl's options: a URL cannot smuggle in a flag.
        return ["curl", "-fsSL", "--", url]
    try:
        argv = shlex.split(url[len("pipe:"):])
    except ValueError as e:
        raise DataError(f"cannot parse the command of {url!r}: {e}") from None
    if not argv:
        raise DataError(f"{url!r} names no command")
    return argv


@contextmanager
def _open_stream(url: str) -> Iterator[Any]:
    if not url.startswith(("pipe:", "http://", "https://")):
        with open(_local_path(url), "rb", buffering=1 << 20) as f:
            yield f
        return
    argv = command_of(url)
    cmd = shlex.join(argv)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, bufsize=1 << 20)
    assert proc.stdout is not None
    try:
        yield proc.stdout
        # The tar reader stops at the end-of-archive marker; read the record padding after it
        # too, or a writer still busy with it dies of SIGPIPE and looks like a failed command.
        while proc.stdout.read(1 << 16):
            pass
    except GeneratorExit:  # the consumer stopped early: not an error of the command
        proc.stdout.close()
        proc.kill()
        proc.wait()
        raise
    except Exception as e:
        # A failed command (missing file, no credentials) shows up as a short stream; name the
        # command's exit status rather than the tar reader's complaint about the short stream.
        proc.stdout.close()
        try:
            rc = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = 0
        if rc not in (0, -signal.SIGPIPE):
            raise OSError(f"command {cmd!r} exited with status {rc} ({e})") from e
        raise
    proc.stdout.close()
    rc = proc.wait()
    if rc != 0:
        raise OSError(f"command {cmd!r} exited with status {rc}")


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


def iter_shard(url: str, counter: BadSampleCounter, labels: LabelPolicy = _DEFAULT_LABELS) -> Iterator[RawSample]:
    """Samples of one shard in tar order. A shard that breaks off is logged, counted as one bad
    sample, and ends early (the partial sample at the break is dropped)."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    n = 0
    try:
        with _open_stream(url) as f:
            for name, data in iter_tar(f):
                split = _split_name(name)
                if split is None:
                    continue
                mkey, ext = split
                if mkey != key:
                    if key is not None:
                        s = _finish_group(key, parts, url, counter, labels)
                        if s is not None:
                            n += 1
                            yield s
                    key, parts = mkey, {}
                parts[ext] = data
            if key is not None:
                s = _finish_group(key, parts, url, counter, labels)
                key = None
                if s is not None:
                    n += 1
                    yield s
    except (OSError, EOFError, ValueError, zlib.error) as e:
        log.error("shard %s is unreadable or truncated after %d sample(s) (at key %r): %s; "
                  "going on with the next shard", url, n, key, e)
        counter.record(url, key or "-", f"shard broke off after {n} samples: {e}")


def shuffled(items: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle buffer; drained in random order when the input ends."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[Any] = []
    for x in items:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        j = rng.randrange(bufsize)
        out, buf[j] = buf[j], x
        yield out
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Epoch `epoch`'s shard permutation, identical on every rank."""
    return torch.randperm(num_shards, generator=generator_for(seed, _TAG_SHARD_ORDER, epoch)).tolist()


# Worker-side datasets ------------------------------------------------------------------------
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
                 labels: LabelPolicy = _DEFAULT_LABELS, max_pixels: int | None = None) -> None:
        super().__init__()
        self.urls = urls
        self.img_size, self.batch_size, self.scale, self.hflip = img_size, batch_size, scale, hflip
        self.shuffle_buffer, self.max_bad_fraction, self.seed = shuffle_buffer, max_bad_fraction, seed
        self.rank, self.world_size, self.num_roles, self.rotation = rank, world_size, num_roles, rotation
        self.starts, self.resampled, self.resample_key = starts, resampled, resample_key
        self.gpu, self.normalize_in_worker = gpu, normalize_in_worker
        self.labels, self.max_pixels = labels, max_pixels

    # One slot's sample stream: yields (epoch, index in epoch, raw sample); index counts
    # samples out of the shuffle buffer, the unit of the saved position.
    def _positions(self, slot: int, role: int, counter: BadSampleCounter) -> Iterator[tuple[int, int, RawSample]]:
        nslots = self.world_size * self.num_roles
        if self.resampled:
            rng = random.Random(mix_seed(self.seed, _TAG_RESAMPLE, self.resample_key, slot))

            def draws() -> Iterator[RawSample]:
                empty = 0
                while True:
                    got = False
                    for s in iter_shard(self.urls[rng.randrange(len(self.urls))], counter, self.labels):
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
            order = shard_order(len(self.urls), self.seed, epoch)
            mine = [self.urls[i] for i in order[slot::nslots]]

            def samples(mine: list[str] = mine) -> Iterator[RawSample]:
                for url in mine:
                    yield from iter_shard(url, counter, self.labels)

            buf_rng = random.Random(mix_seed(self.seed, _TAG_BUFFER, epoch, slot))
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
                    box = sample_crop_box(img.size[0], img.size[1], self.scale, gen=gen)
                    flip = sample_flip(self.hflip, gen)
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
            lab = torch.tensor(labels, dtype=torch.int64)
            if self.gpu:
                payload: Any = {"items": items}
            else:
                with single_thread():
                    payload = torch.stack(items)
                    if self.normalize_in_worker:
                        payload = normalize(payload)
            items, labels = [], []
            yield payload, lab, meta


class SyntheticTrainSource(IterableDataset):
    """Endless batches of the synthetic set for one rank: epoch e visits a permutation keyed on
    (seed, e); rank r takes global batches b * world + r; batch j of this rank goes to worker
    (j - start) mod W; augmentation is keyed on (seed, epoch, global batch)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, img_size: int,
                 scale: tuple[float, float], hflip: bool, seed: int, rank: int, world_size: int,
                 num_roles: int, start: int, normalize_in_worker: bool) -> None:
        super().__init__()
        self.images, self.labels = images, labels
        self.batch_size, self.img_size, self.scale, self.hflip = batch_size, img_size, scale, hflip
        self.seed, self.rank, self.world_size, self.num_roles = seed, rank, world_size, num_roles
        self.start, self.normalize_in_worker = start, normalize_in_worker
        self.batches_per_epoch = len(images) // (batch_size * world_size)

    def batch(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch j (0, 1, ... across epochs) of this rank: uint8 images and labels."""
        epoch, b = divmod(j, self.batches_per_epoch)
        perm = torch.randperm(len(self.images), generator=generator_for(self.seed, _TAG_SYN_PERM, epoch))
        gb = b * self.world_size + self.rank
        idx = perm[gb * self.batch_size : (gb + 1) * self.batch_size]
        gen = generator_for(self.seed, _TAG_SYN_AUG, epoch, gb)
        H, W = self.images.shape[-2:]
        boxes, flips = [], []
        for _ in range(len(idx)):
            boxes.append(sample_crop_box(W, H, self.scale, gen=gen))
            flips.append(sample_flip(self.hflip, gen))
        out = crop_resize_flip_batch(self.images[idx], torch.tensor(boxes, dtype=torch.float32),
                                     torch.tensor(flips), self.img_size)
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
                "train", d.synthetic_images, d.synthetic_classes, d.img_size, kind=d.synthetic_kind)
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


# Evaluation arrays -----------------------------------------------------------------------------
def build_eval_arrays(cfg: Config, split: str, max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (images float32 (M,3,S,S) normalised, labels int64 (M,)), no augmentation.

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
            for raw in iter_shard(url, counter, LabelPolicy(True, d.num_classes)):
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


__all__ = [
    "TrainStream", "build_train_stream", "build_eval_arrays", "expand_urls", "brace_expand",
    "iter_shard", "shuffled", "shard_order", "read_raw_labels", "RawSample", "WdsTrainSource",
    "SyntheticTrainSource",
]
