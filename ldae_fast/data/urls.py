"""Shard URLs: brace expansion, local and remote URLs, and opening one without a shell.

URLs: local paths, `file:PATH`, brace patterns (`train-{000000..000146}.tar`), several patterns
joined by `::`, `pipe:COMMAND ARGS` (one command, split like a shell would split it but run
without a shell, so no pipes or redirections; it writes the shard to stdout) and http(s) URLs
(read by `curl`, the URL passed as one argument). Configs stored in checkpoints or exports never
bring a pipe: or remote URL into effect (see config.sanitize_stored_config).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .badsamples import DataError

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


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def local_path(url: str) -> str:
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
        missing = [u for u in urls if is_local(u) and not os.path.isfile(local_path(u))]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DataError(f"{what}={pattern!r}: {len(missing)} of {len(urls)} shard file(s) "
                            f"not found: {shown} (relative paths are taken from {os.getcwd()})")
    return urls


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
def open_url(url: str) -> Iterator[Any]:
    if not url.startswith(("pipe:", "http://", "https://")):
        with open(local_path(url), "rb", buffering=1 << 20) as f:
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


__all__ = ["brace_expand", "expand_urls", "is_local", "local_path", "command_of", "open_url"]
