"""Tiny labelled shard sets for the streaming-eval tests (written, never read from shared data)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def class_image(label: int, rng: np.random.Generator, size: int, classes: int) -> np.ndarray:
    """A colour per class plus noise, non-square so crops differ from the eval view."""
    hue = np.array([(label * 97) % 256, (label * 41 + 80) % 256, (255 - label * 53) % 256], np.float32)
    img = hue + rng.normal(0, 40, size=(size, size + size // 4, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_split(root: Path, split: str, shards: int, per_shard: int, *, size: int = 32, classes: int = 4,
                seed: int = 0, corrupt: tuple[int, int] | None = None) -> str:
    """`shards` tar shards of `per_shard` samples; returns the brace pattern. `corrupt` =
    (shard, ordinal) whose JPEG is cut short (a bad sample)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = 0
    for s in range(shards):
        with tarfile.open(root / f"{split}-{s:06d}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for j in range(per_shard):
                label = n % classes
                data = _jpeg(class_image(label, rng, size, classes))
                if corrupt == (s, j):
                    data = data[: len(data) // 3]
                for name, payload in ((f"{split}{n:07d}.jpg", data), (f"{split}{n:07d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                n += 1
    last = shards - 1
    return str(root / (f"{split}-000000.tar" if shards == 1 else f"{split}-{{000000..{last:06d}}}.tar"))
