"""The train sources by data.source: the one list `stream.TrainStream` picks its source from.

Image sources live in sources.py, clip sources in video.py; a new source is a new module plus
one line here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .badsamples import DataError
from .sources import SyntheticSource, WdsSource
from .video import SyntheticVideoSource, WdsVideoSource

if TYPE_CHECKING:
    from ..config import Config

# Images by data.source ('resident' has its own stream: resident.py).
SOURCES: dict[str, type] = {"synthetic": SyntheticSource, "wds": WdsSource}
# Clips (data.num_frames > 0) by data.source.
VIDEO_SOURCES: dict[str, type] = {"synthetic": SyntheticVideoSource, "wds-video": WdsVideoSource}


def source_for(cfg: Config) -> type:
    """The source class of cfg.data: VIDEO_SOURCES for clips, else SOURCES, by data.source."""
    d = cfg.data
    if d.num_frames and d.source in VIDEO_SOURCES:
        return VIDEO_SOURCES[d.source]
    if d.source not in SOURCES:
        raise DataError(f"TrainStream reads data.source in {sorted(SOURCES) + ['wds-video']}, not {d.source!r}: "
                        "build the stream with build_train_stream")
    return SOURCES[d.source]


__all__ = ["SOURCES", "VIDEO_SOURCES", "source_for"]
