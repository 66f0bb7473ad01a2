"""Shard URLs: expanding a shard string and opening each URL without a shell.

URLs: local paths, `file:PATH`, brace patterns (`train-{000000..000146}.tar`), several patterns
joined by `::`, `pipe:COMMAND ARGS` (one command, split like a shell would split it but run
without a shell, so no pipes or redirections; it writes the shard to stdout) and http(s) URLs
(read by `curl`, the URL passed as one argument). The grammar (expansion, what kind each URL is)
lives in ldae_fast/shard_urls.py, which also decides which stored strings may be used: configs
stored in checkpoints, exports or `--config` files never bring a pipe: or remote URL into effect.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..shard_urls import brace_expand, expand_pattern, local_path, pipe_command, url_kind
from .badsamples import DataError


def is_local(url: str) -> bool:
    return url_kind(url) == "local"


def expand_urls(pattern: str, what: str = "data.train_shards", check_exists: bool = True) -> list[str]:
    """Shard URLs of a pattern (`::` separates patterns); clear errors for an empty pattern, an
    expansion to nothing, and missing local files (all named, with the pattern)."""
    urls = expand_pattern(pattern, what)
    for url in urls:
        _check_readable(url, what)
    if check_exists:
        missing = [u for u in urls if is_local(u) and not os.path.isfile(local_path(u))]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DataError(f"{what}={pattern!r}: {len(missing)} of {len(urls)} shard file(s) "
                            f"not found: {shown} (relative paths are taken from {os.getcwd()})")
    return urls


def _check_readable(url: str, what: str) -> None:
    """Of the remote URLs, curl reads http(s) only; name the way to read the others."""
    if url_kind(url) == "remote" and not url.strip().lower().startswith(("http://", "https://")):
        raise DataError(f"{what}: cannot open {url!r}; use a local path, http(s):// or "
                        f"'pipe:COMMAND' (e.g. 'pipe:aws s3 cp {url.strip()} -')")


def command_of(url: str) -> list[str]:
    """The argv a remote or pipe: URL is read with; never a shell command line."""
    kind = url_kind(url)
    if kind == "local":
        raise ValueError(f"{url!r} is a local path, opened as a file, not by a command")
    if kind == "remote":
        _check_readable(url, "shard URL")
        # "--" ends curl's options: a URL cannot smuggle in a flag.
        return ["curl", "-fsSL", "--", url.strip()]
    try:
        argv = shlex.split(pipe_command(url))
    except ValueError as e:
        raise DataError(f"cannot parse the command of {url!r}: {e}") from None
    if not argv:
        raise DataError(f"{url!r} names no command")
    return argv


@contextmanager
def open_url(url: str) -> Iterator[Any]:
    if url_kind(url) == "local":
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
