"""The data sources by data.source: the one list the config checks data.source against and
`stream.TrainStream` picks its source from.

Image sources live in sources.py, clip sources in video.py, the in-memory set in resident.py; a
new source is a new module plus one line in SOURCES. This module is torch-free (each source's class
is imported when a stream asks for it), so a config is checked before torch loads: it registers
every source with the config mechanism (config_registry.py) on import, which importing
ldae_fast.methods does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, NamedTuple

from ..config_registry import SourceKind, register_source
from .badsamples import DataError

if TYPE_CHECKING:
    from ..config import Config


class Source(NamedTuple):
    kind: SourceKind
    images: str = ""
    """'module:Class' of its image source ('' : none, or a stream of its own: resident)."""
    clips: str = ""
    """'module:Class' of its clip source (data.num_frames > 0; '' : none)."""


SOURCES: dict[str, Source] = {s.kind.name: s for s in (
    Source(SourceKind("synthetic", sharded=False, images=True, video=True),
           images="sources:SyntheticSource", clips="video:SyntheticVideoSource"),
    Source(SourceKind("wds", sharded=True, images=True, video=False), images="sources:WdsSource"),
    # Its own stream (resident.ResidentStream, picked by stream.build_train_stream).
    Source(SourceKind("resident", sharded=True, images=True, video=False)),
    Source(SourceKind("wds-video", sharded=True, images=False, video=True), clips="video:WdsVideoSource"),
)}
for _source in SOURCES.values():
    register_source(_source.kind)


def _load(ref: str) -> type:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)


def source_for(cfg: Config) -> type:
    """The source class of cfg.data: its clip source for clips, else its image source."""
    d = cfg.data
    entry = SOURCES.get(d.source)
    ref = (entry.clips if d.num_frames else entry.images) if entry else ""
    if not ref:
        readable = sorted(n for n, s in SOURCES.items() if s.images or s.clips)
        raise DataError(f"TrainStream reads data.source in {readable}, not {d.source!r}"
                        f"{' with data.num_frames=' + str(d.num_frames) if d.num_frames else ''}: "
                        "build the stream with build_train_stream")
    return _load(ref)


__all__ = ["SOURCES", "Source", "source_for"]
