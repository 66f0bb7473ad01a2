"""The shard URL grammar and its trust rule (ldae_fast/shard_urls.py): a seeded fuzz test over the
grammar, checking that no string a file stores reaches a command or the network through the reader.

The oracle below is written independently of the implementation: it says, for one URL the reader
expanded, whether it runs a command or reaches the network (any case of `pipe:` after whitespace,
any `scheme://` other than file, a known object-store scheme). The reader itself is exercised too:
every URL of an accepted string is opened with process creation made to fail the test.
"""

import random
import re
import warnings

import pytest

from ldae_fast.data import urls as reader
from ldae_fast.errors import DataError
from ldae_fast.shard_urls import (
    MAX_URLS,
    brace_expand,
    expand_pattern,
    sanitize_stored_config,
    untrusted_urls,
    url_kind,
)

SEED = 20261206
CASES = 10000

# Pieces of the grammar, malicious and ordinary: schemes in several cases and spacings, the `::`
# separator, path pieces, command words.
_SCHEMES = ["pipe:", "PIPE:", "Pipe:", " pipe:", "\tpipe:", "pipe :", "http:", "https:", "HTTP:", "Https:",
            "s3:", "S3:", "gs:", "file:", "FILE:", "hdfs:", "ftp:"]
_WORDS = ["//", "://", "/", "./", "../", "::", ":", " ", "touch M", "cat x", "x", "data", "-", ".tar",
          "train-", "a.tar", "..", "0", "1", "7", "127.0.0.1", "host", ",", "sh -c 'id'", "'", "\\"]


def _atom(rng: random.Random, budget: "_Budget") -> str:
    r = rng.random()
    if r < 0.3:
        return _split(rng, rng.choice(_SCHEMES), budget)
    if r < 0.9:
        return rng.choice(_WORDS)
    return str(rng.randint(0, 12))


def _split(rng: random.Random, text: str, budget: "_Budget") -> str:
    """`text`, or `text` cut by a brace group so that only expansion joins it again:
    `{pi,x}pe:` or `p{ipe,y}:` (the shapes of `{pipe:,x}touch X` and `{http:,x}//host`)."""
    if len(text) < 2 or rng.random() < 0.4 or not budget.take():
        return text
    k = rng.randint(1, len(text) - 1)
    other = rng.choice(["x", "", "a/", "{y,z}"])
    if rng.random() < 0.5:
        return "{" + text[:k] + "," + other + "}" + text[k:]
    return text[:k] + "{" + text[k:] + "," + other + "}"


class _Budget:
    """Brace groups left for one generated string: bounds how many URLs it expands to."""

    def __init__(self, n: int):
        self.n = n

    def take(self) -> bool:
        self.n -= 1
        return self.n >= 0


def _brace(rng: random.Random, budget: _Budget) -> str:
    if rng.random() < 0.3:
        a = rng.randint(-1, 4)
        b = a + rng.randint(-1, 2)
        pad = rng.choice(["", "0", "00"]) if min(a, b) >= 0 else ""
        return "{" + f"{pad}{a}..{pad}{b}" + "}"
    # Mostly two or three items; one item (`{x}`) is a pattern the reader refuses.
    items = [_seq(rng, budget) for _ in range(1 if rng.random() < 0.05 else rng.randint(2, 3))]
    return "{" + ",".join(items) + "}"


def _seq(rng: random.Random, budget: _Budget) -> str:
    out = [_split(rng, rng.choice(_SCHEMES), budget)] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        out.append(_brace(rng, budget) if rng.random() < 0.35 and budget.take() else _atom(rng, budget))
    return "".join(out)


def _generate(rng: random.Random) -> str:
    budget = _Budget(3)
    s = _seq(rng, budget)
    if rng.random() < 0.2:
        s = "::".join([s, _seq(rng, budget)])
    if rng.random() < 0.1:  # unbalanced braces: what the reader cannot expand
        s = s.replace("}", "", 1) if rng.random() < 0.5 else "{" + s
    return s


_OBJECT_STORES = ("http", "https", "s3", "gs", "hdfs", "ftp")


def _runs_or_fetches(url: str) -> bool:
    """Independent oracle for one expanded URL."""
    s = url.strip().lower()
    if s.startswith("pipe:"):
        return True
    m = re.match(r"([a-z][a-z0-9+.\-]*):", s)
    scheme = m.group(1) if m else ""
    if scheme == "file":
        return False
    return "://" in s or scheme in _OBJECT_STORES


def _reader_urls(s: str) -> list[str]:
    """What the reader would try to open (nothing when it refuses the string)."""
    try:
        return reader.expand_urls(s, check_exists=False)
    except DataError:
        return []


def test_fuzz_no_stored_string_reaches_a_command_or_the_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths name files that do not exist

    def refuse(argv, *a, **k):
        raise AssertionError(f"the reader started {argv!r}")

    monkeypatch.setattr(reader.subprocess, "Popen", refuse)
    rng = random.Random(SEED)
    accepted = refused = dangerous_seen = hidden = 0
    for _ in range(CASES):
        s = _generate(rng)
        expanded = _reader_urls(s)
        bad = untrusted_urls(s)
        dangerous = [u for u in expanded if _runs_or_fetches(u)]
        dangerous_seen += bool(dangerous)
        hidden += bool(dangerous) and not _runs_or_fetches(s)  # only expansion makes it dangerous
        # Whatever the reader would open that runs or fetches is refused (none slips through)...
        assert set(dangerous) <= set(bad) or bad == [s], (s, dangerous, bad)
        # ...and a string is refused only for what it would do, never for a local path.
        assert all(_runs_or_fetches(u) or u == s for u in bad), (s, bad)
        # The stored-config path blanks exactly the refused strings.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = sanitize_stored_config({"data": {"train_shards": s}}, "fuzz")["data"]["train_shards"]
        assert got == ("" if bad else s)
        if bad:
            refused += 1
            continue
        accepted += 1
        for url in expanded:  # an accepted string opens files only, never a process
            assert url_kind(url) == "local"
            with pytest.raises(OSError):
                with reader.open_url(url):
                    pass
    # The generator reaches both sides, and the dangerous side often through braces or `::` only.
    assert accepted > CASES // 10 and refused > CASES // 10
    assert dangerous_seen > CASES // 10 and hidden > CASES // 20, (dangerous_seen, hidden)


@pytest.mark.parametrize("s, expect", [
    ("{pipe:touch X,pipe:touch Y}", ["pipe:touch X", "pipe:touch Y"]),
    ("{pipe:,x}touch X", ["pipe:touch X"]),
    ("{http:,x}//host/x.tar", ["http://host/x.tar"]),
    ("a.tar::{b,PIPE:cat c}", ["PIPE:cat c"]),
    ("  Pipe:cat c  ", ["Pipe:cat c"]),
    ("{s3,gs}://b/{0..1}.tar", ["s3://b/0.tar", "s3://b/1.tar", "gs://b/0.tar", "gs://b/1.tar"]),
    ("s3:bucket/key.tar", ["s3:bucket/key.tar"]),
    ("{abc}pipe:cat x", ["{abc}pipe:cat x"]),  # unexpandable, but names a command: refused whole
    ("file:/data/x-{0..1}.tar", []),
    ("FILE:///data/x.tar", []),
    ("data/train-{000..002}.tar::../val.tar", []),
    ("./pipe:x.tar", []),  # a relative path with a colon in a name, opened as a file
    ("{abc}x", []),
])
def test_untrusted_urls_judges_the_expansion(s, expect):
    assert untrusted_urls(s) == expect


def test_the_reader_expands_and_classifies_as_the_trust_rule_does():
    # The same expansion: brace_expand / expand_pattern are the reader's (data/urls.py imports them).
    assert reader.brace_expand is brace_expand
    assert reader.expand_urls("{a,b}-{1..2}::c", check_exists=False) == expand_pattern("{a,b}-{1..2}::c")
    # A case or whitespace variant of pipe: is a command to the reader too (a typed one runs).
    assert reader.command_of(" PIPE:cat 'a b'") == ["cat", "a b"]
    assert reader.command_of("HTTPS://h/x.tar") == ["curl", "-fsSL", "--", "HTTPS://h/x.tar"]
    with pytest.raises(DataError, match="cannot open"):
        reader.command_of("s3://bucket/x.tar")


def test_a_huge_range_is_refused_before_it_is_expanded():
    with pytest.raises(DataError, match=f"more than {MAX_URLS} shards"):
        expand_pattern("x-{0..999999999}.tar")


@pytest.mark.parametrize("bomb", ["{0..99999}", "{a,b}" * 2000, "{0..99}{0..99}{0..9}"])
def test_expansion_bombs_are_refused(bomb, monkeypatch):
    import ldae_fast.shard_urls as su

    monkeypatch.setattr(su, "MAX_URLS", 1000)  # the mechanism, at a size a test can afford
    with pytest.raises(DataError, match="more than 1000"):
        expand_pattern(bomb)
    # A bomb that also names a command is still refused by the trust rule.
    assert untrusted_urls("pipe:x" + bomb) == ["pipe:x" + bomb]
