"""The shard URL grammar, and which shard strings read from a file may be used.

A `data.train_shards` / `data.val_shards` string is one or more patterns joined by `::`; each
pattern is brace-expanded (`train-{000000..000146}.tar`, `{a,b}`, nested); each resulting URL is a
local path (`file:PATH` too), a `pipe:COMMAND` or a remote URL. `expand_pattern` and `url_kind`
are the reader's own expansion and classification (data/urls.py opens URLs through them), so the
trust rule below judges exactly what the reader would open and the two cannot disagree.

Trust: a URL that runs a command or reaches the network is used only when the user typed the
string on this run's command line. A string stored in a file (a checkpoint's config, an export's
metadata, a `--config` file) is judged by `untrusted_urls`: after `::` splitting, brace expansion
and normalisation (surrounding whitespace, the scheme's case), never on the raw text, since
`{pipe:x,y}` or `{pipe:,x}cmd` only becomes a command after expansion.

Pure string work, no I/O and no heavy imports: the config mechanism and the readers both use it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from .errors import DataError

# A pattern expanding to more URLs (or more text) than this is refused while it is expanded: no
# shard set is that large, and a stored `{0..999999999}` or `{a,b}` x 1000 must not exhaust memory
# or time while being checked.
MAX_URLS = 1_000_000
MAX_CHARS = 1 << 27

# Shard URL fields of the data section: the only config strings the reader opens.
SHARD_FIELDS = ("train_shards", "val_shards")

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
# Schemes of object stores and file servers: remote even without `//` (`s3:bucket/key`).
_REMOTE_SCHEMES = frozenset({"http", "https", "ftp", "ftps", "sftp", "ssh", "scp", "rsync", "s3", "gs",
                             "gcs", "az", "abfs", "abfss", "wasb", "wasbs", "hdfs", "webhdfs", "hf", "ais"})
# Used only for a pattern the reader cannot expand (so would not open): refuse it anyway when it
# mentions a command or a scheme.
_MENTIONS = re.compile(r"pipe\s*:|://|\b(?:" + "|".join(sorted(_REMOTE_SCHEMES)) + r")\s*:", re.IGNORECASE)


def _brace_items(body: str, pattern: str) -> Iterable[str]:
    rng = _RANGE.fullmatch(body)
    if rng:
        a_s, b_s = rng.groups()
        a, b = int(a_s), int(b_s)
        if b - a + 1 > MAX_URLS:
            raise DataError(f"{{{body}}} in shard pattern {pattern!r} expands to more than {MAX_URLS} shards")
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-")[0] == "0" for x in (a_s, b_s))
        width = max(len(a_s), len(b_s)) if padded else 0
        return [str(i).zfill(width) for i in range(a, b + 1)]
    if "," in body:
        return body.split(",")
    raise DataError(f"cannot expand {{{body}}} in shard pattern {pattern!r}: "
                    f"use {{A..B}} (numbers) or {{x,y,z}}")


def _iter_braces(pattern: str) -> Iterator[str]:
    """Depth-first expansion of the leftmost innermost brace group, without recursion (a pattern
    of many groups must not hit Python's recursion limit)."""
    stack = [pattern]
    while stack:
        p = stack.pop()
        m = _BRACE.search(p)
        if not m:
            yield p
            continue
        head, tail = p[: m.start()], p[m.end():]
        stack.extend(head + item + tail for item in reversed(list(_brace_items(m.group(1), pattern))))


def _expand(parts: list[str], pattern: str) -> Iterator[tuple[str, list[str]]]:
    """(part, its URLs) for each part, with the size limits applied across all parts."""
    count = chars = 0
    for part in parts:
        got = []
        for url in _iter_braces(part):
            count, chars = count + 1, chars + len(url)
            if count > MAX_URLS or chars > MAX_CHARS:
                raise DataError(f"shard pattern {pattern[:80]!r} expands to more than {MAX_URLS} shards "
                                f"or {MAX_CHARS} characters of URLs")
            got.append(url)
        yield part, got


def brace_expand(pattern: str) -> list[str]:
    """Shell-style brace expansion: `{000..012}` (zero padding kept) and `{a,b,c}`, nested."""
    return next(_expand([pattern], pattern))[1]


def expand_pattern(pattern: str, what: str = "data.train_shards") -> list[str]:
    """Every URL a shard string stands for, in order: `::`-separated patterns (each stripped),
    each brace-expanded. The reader's expansion; errors name `what` and the pattern."""
    parts = [p.strip() for p in pattern.split("::") if p.strip()]
    if not parts:
        raise DataError(f"{what} is empty: give shard paths such as "
                        f"'data/train-{{000000..000009}}.tar' (write them with `ldae-fast make-shards`)")
    urls: list[str] = []
    for part, got in _expand(parts, pattern):
        if not got:
            raise DataError(f"{what}={pattern!r}: {part!r} expands to no shard (is a range reversed?)")
        urls.extend(got)
    return urls


def _scheme(url: str) -> tuple[str, str]:
    """(scheme in lower case or '', the URL after 'scheme:'), surrounding whitespace ignored."""
    s = url.strip()
    m = _SCHEME.match(s)
    return (m.group(1).lower(), s[m.end():]) if m else ("", s)


def url_kind(url: str) -> str:
    """'pipe' (runs a command), 'remote' (reaches the network) or 'local' (a path, `file:PATH`).
    The scheme is case-insensitive and surrounding whitespace does not hide it."""
    scheme, _ = _scheme(url)
    if scheme == "pipe":
        return "pipe"
    if scheme == "file":
        return "local"
    if scheme in _REMOTE_SCHEMES or "://" in url:
        return "remote"
    return "local"


def local_path(url: str) -> str:
    """The file a local URL names (`file:PATH` -> PATH; a plain path as given)."""
    scheme, rest = _scheme(url)
    return rest if scheme == "file" else url


def pipe_command(url: str) -> str:
    """The command text of a `pipe:` URL."""
    return _scheme(url)[1]


def untrusted_urls(pattern: str) -> list[str]:
    """The URLs of a shard string that would run a command or reach the network, judged on what
    the reader would open (after `::` splitting, brace expansion and normalisation). A string the
    reader cannot expand opens nothing; it is still refused (returned whole) when it mentions a
    command or a scheme."""
    try:
        urls = expand_pattern(pattern)
    except DataError:
        return [pattern] if _MENTIONS.search(pattern) else []
    return [u for u in urls if url_kind(u) != "local"]


def untrusted_shard_fields(data: Any, given: Iterable[str] = ()) -> dict[str, str]:
    """{'data.FIELD': value} for each shard field of a stored data section whose URLs are not all
    local, except the fields in `given` (keys the user typed on this command line)."""
    if not isinstance(data, dict):
        return {}
    given = set(given)
    bad = {}
    for f in SHARD_FIELDS:
        key, v = f"data.{f}", data.get(f)
        if key not in given and isinstance(v, str) and untrusted_urls(v):
            bad[key] = v
    return bad


def sanitize_stored_config(d: dict[str, Any], source: str, from_cli: Iterable[str] = ()) -> dict[str, Any]:
    """A config dict read from a file (a checkpoint, an export) with every shard field that would
    run a command or reach the network blanked, with a warning naming the field: a downloaded file
    must not run a command or fetch from a host of its choosing. Fields in `from_cli` (typed on
    this run's command line) are kept."""
    bad = untrusted_shard_fields(d.get("data"), from_cli)
    if not bad:
        return d
    out = {**d, "data": dict(d["data"])}
    for key, v in bad.items():
        out["data"][key.partition(".")[2]] = ""
        warnings.warn(f"{source} stores {key}={v[:80]!r}, which expands to a pipe: command or remote URL; "
                      f"it is not used (pass --{key}=... on the command line to use such a URL)",
                      stacklevel=2)
    return out


__all__ = ["MAX_URLS", "SHARD_FIELDS", "brace_expand", "expand_pattern", "url_kind", "local_path",
           "pipe_command", "untrusted_urls", "untrusted_shard_fields", "sanitize_stored_config"]
