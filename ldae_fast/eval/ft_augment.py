"""The fine-tune's augmentation on the streaming path, every draw keyed.

timm's RandAugment, RandomErasing and Mixup draw from the process-global generators (Python's
`random`, NumPy's, torch's), and DropPath from torch's. Here each use runs inside `keyed_rng`,
which seeds those generators from one key and puts back what was there before, so a draw is a
function of its key alone:

- per sample, in the decode workers: RandAugment, keyed on (seed, epoch, logical reader, index in
  the reader's epoch [, repeat]), like the stream's crop and flip; a clip's frames share one key,
  so every frame gets the same operations at the same magnitudes;
- per micro-batch, in the training loop: RandomErasing, MixUp / CutMix and the forward pass's
  drop path / dropout, keyed on (seed, step, logical reader, piece of that reader's share).
A micro-batch is a piece of one logical reader's share of the global batch, so its content and
its draws are the same whatever the rank count, and a resumed run redraws exactly what the
interrupted one would have drawn: the generators' state is (seed, step), nothing to save.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from ldae_fast.data.transforms import IMAGENET_MEAN, pil_to_tensor
from ldae_fast.seeding import derive_seed

# Domain tags of the fine-tune's draws (eval/stream.py's are 26-27; see seeding.py).
TAG_RANDAUG = 28
TAG_BATCH = 29


@contextmanager
def keyed_rng(*key: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global generators (CPU, and `device`'s when it is a
    GPU) from derive_seed(*key) for the enclosed block; restore them after."""
    s = derive_seed(*key)
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class _PosterizeOrBlack:
    """timm's PosterizeIncreasing asks for 0 bits at magnitude 10 (reached by m9 + noise 0.5);
    Pillow 13 rejects that where older Pillow returned a black image. Keep the old result."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, img, bits, **kw):
        if bits < 1:
            from PIL import Image

            return Image.new(img.mode, img.size)
        return self.fn(img, bits, **kw)


def rand_augment(spec: str, size: int, mean01: tuple[float, ...] = IMAGENET_MEAN):
    """timm's RandAugment for `spec` (e.g. 'rand-m9-mstd0.5-inc1'), filled with the dataset mean
    and translating by up to 0.45 of the side, as timm's create_transform sets it up."""
    from timm.data.auto_augment import rand_augment_transform

    hp = dict(translate_const=int(size * 0.45), img_mean=tuple(int(round(255 * m)) for m in mean01))
    ra = rand_augment_transform(spec, hp)
    for op in getattr(ra, "ops", ()):
        if "Posterize" in getattr(op, "name", ""):
            op.aug_fn = _PosterizeOrBlack(op.aug_fn)
    return ra


def apply_rand_augment(ra, frames: torch.Tensor, key: tuple[int, ...]) -> torch.Tensor:
    """uint8 (3, S, S) or (3, T, S, S) -> the same after RandAugment, the draws keyed on `key`
    (the same for every frame of a clip)."""
    from PIL import Image

    clip = frames.dim() == 4
    seq = frames.unbind(1) if clip else (frames,)
    out = []
    for f in seq:
        with keyed_rng(TAG_RANDAUG, *key):
            out.append(pil_to_tensor(ra(Image.fromarray(f.permute(1, 2, 0).numpy()))))
    return torch.stack(out, 1) if clip else out[0]


__all__ = ["keyed_rng", "rand_augment", "apply_rand_augment", "TAG_RANDAUG", "TAG_BATCH"]
