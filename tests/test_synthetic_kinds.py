"""data.synthetic_kind: the 'layouts' and 'gratings' sets are deterministic per index, balanced,
and their classes carry no colour signal; the default kind is the original 'shapes' set, and the
demo preset uses 'gratings'."""

from __future__ import annotations

import pytest
import torch

from ldae_fast.config import build_config
from ldae_fast.data import build_eval_arrays, build_train_stream, normalize
from ldae_fast.data.synthetic import make_synthetic, synthetic_split


@pytest.mark.parametrize("kind", ["layouts", "gratings"])
def test_new_kinds_are_a_pure_function_of_the_index(kind):
    a, la = make_synthetic(40, 8, 32, kind=kind)
    b, lb = make_synthetic(6, 8, 32, start=17, kind=kind)
    assert torch.equal(a[17:23], b) and torch.equal(la[17:23], lb)
    assert a.dtype == torch.uint8 and a.shape == (40, 3, 32, 32)
    assert torch.bincount(la).tolist() == [5] * 8
    # Another kind, other images (the same index does not give the shapes set's picture).
    s, ls = make_synthetic(40, 8, 32)
    assert torch.equal(ls, la) and not torch.equal(s, a)


def test_default_kind_is_the_shapes_set_and_the_demo_uses_gratings():
    from ldae_fast.config import DataConfig

    assert DataConfig().synthetic_kind == "shapes" and build_config("demo").data.synthetic_kind == "gratings"
    cfg = build_config("demo", {"data.synthetic_kind": "shapes"})
    imgs, _ = build_eval_arrays(cfg, "val", max_images=8)
    want, _ = make_synthetic(8, cfg.data.synthetic_classes, cfg.data.img_size, start=cfg.data.synthetic_images)
    assert torch.equal(imgs, normalize(want))


@pytest.mark.parametrize("kind", ["layouts", "gratings"])
def test_classes_differ_in_structure_not_colour(kind):
    imgs, labels = make_synthetic(800, 8, 32, kind=kind)
    x = imgs.float() / 255
    mean_rgb = x.mean(dim=(2, 3))  # (N, 3)
    per_class = torch.stack([mean_rgb[labels == c].mean(0) for c in range(8)])
    within = mean_rgb.std(0)
    # Class means of the mean colour lie well inside the spread of single images.
    assert bool(((per_class - mean_rgb.mean(0)).abs() < 0.35 * within).all())
    # The amount of contrast (dots or stripes) is about the same for every class.
    bright = (x - x.mean(dim=(2, 3), keepdim=True)).abs().mean(dim=(1, 2, 3))
    cover = torch.stack([bright[labels == c].mean() for c in range(8)])
    assert float(cover.max() / cover.min()) < 1.3


def test_the_training_stream_reads_the_chosen_kind():
    cfg = build_config("demo", {"data.synthetic_kind": "layouts", "data.synthetic_images": "128",
                                "data.batch_size": "32"})
    x, y = next(iter(build_train_stream(cfg)))
    assert x.shape == (32, 3, 32, 32) and int(y.max()) < 8
    imgs, _ = synthetic_split("train", 128, 8, 32, kind="layouts")
    ev, _ = build_eval_arrays(cfg, "train")
    assert ev.shape[0] == 128 and imgs.shape[0] == 128
