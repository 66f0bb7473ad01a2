"""data.source=resident: decode once (cached), keyed epoch permutations, exact resume, batched
crop + flip, labels, the CPU path through the trainer, and engine.time_budget_s."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldae_fast.config import build_config
from ldae_fast.data import build_eval_arrays, build_train_stream, normalize, resident
from ldae_fast.data.badsamples import DataError
from ldae_fast.data.eval_arrays import read_raw_labels


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resident-cache")


@pytest.fixture
def resident_cfg(tinyimagenet_dir):
    """cfg(cache_dir, **overrides): the demo preset on the resident Tiny ImageNet shards."""
    return lambda cache, **over: _cfg(tinyimagenet_dir, cache, **over)


def _cfg(d: Path, cache: Path, **over):
    o = {"data.source": "resident", "data.train_shards": str(d / "train-000000.tar.gz"),
         "data.val_shards": str(d / "val-000000.tar.gz"), "data.epoch_size": "5050",
         "data.cache_dir": str(cache), "data.batch_size": "64", "engine.device": "cpu"}
    o.update({k: str(v) for k, v in over.items()})
    return build_config("demo", o)


def test_decodes_once_then_reads_the_cache(tmp_path, monkeypatch, resident_cfg):
    calls = []
    real = resident.decode_shards

    def counting(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(resident, "decode_shards", counting)
    monkeypatch.setattr(resident, "_LOADED", {})
    cfg = resident_cfg(tmp_path)
    s1 = build_train_stream(cfg)
    assert calls == [32]
    assert list(tmp_path.glob("resident-*.json")), "no cache sidecar written"
    monkeypatch.setattr(resident, "_LOADED", {})  # as a new process would start
    s2 = build_train_stream(cfg)
    assert calls == [32], "the second build decoded again instead of reading the cache"
    assert torch.equal(s1.images, s2.images) and torch.equal(s1.labels, s2.labels)
    # Another decode size is another cache entry.
    monkeypatch.setattr(resident, "_LOADED", {})
    build_train_stream(resident_cfg(tmp_path, **{"data.resident_decode_size": 40}))
    assert calls == [32, 40]


def test_damaged_cache_is_decoded_again(tmp_path, monkeypatch, resident_cfg):
    monkeypatch.setattr(resident, "_LOADED", {})
    cfg = resident_cfg(tmp_path)
    build_train_stream(cfg)
    (npy,) = [p for p in tmp_path.glob("resident-*.npy") if not p.name.endswith("-labels.npy")]
    npy.write_bytes(npy.read_bytes()[:1000])
    monkeypatch.setattr(resident, "_LOADED", {})
    calls = []
    real = resident.decode_shards
    monkeypatch.setattr(resident, "decode_shards", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = build_train_stream(cfg)
    assert calls == [1] and s.num_images == 5050


def test_labels_and_images_match_the_shard(cache_dir, resident_cfg):
    cfg = resident_cfg(cache_dir)
    imgs, labels = resident.resident_arrays(cfg, "train")
    want = [lab for _, lab in read_raw_labels(cfg.data.train_shards)]
    assert labels.tolist() == want
    assert imgs.dtype == torch.uint8 and imgs.shape == (5050, 3, 32, 32)
    # Decoded by the evaluation rule: the eval arrays are the same images, normalised.
    ev, ev_labels = build_eval_arrays(build_config("demo", {
        "data.source": "wds", "data.train_shards": cfg.data.train_shards, "data.epoch_size": "5050"}),
        "train", max_images=300)
    assert torch.equal(ev, normalize(imgs[:300])) and torch.equal(ev_labels, labels[:300])


def test_class_subset(cache_dir, resident_cfg):
    cfg = resident_cfg(cache_dir, **{"data.class_subset": 10})
    _, labels = resident.resident_arrays(cfg, "train")
    _, vlabels = resident.resident_arrays(cfg, "val")
    assert set(labels.tolist()) == set(range(10)) and set(vlabels.tolist()) == set(range(10))
    s = build_train_stream(cfg)
    for _ in range(3):
        _, y = next(s)
        assert int(y.max()) < 10


def test_permutation_keyed_on_seed_and_epoch(cache_dir, resident_cfg):
    s = build_train_stream(resident_cfg(cache_dir))
    p0, p1 = s.permutation(0).clone(), s.permutation(1).clone()
    n = s.num_images
    assert sorted(p0.tolist()) == list(range(n)) and sorted(p1.tolist()) == list(range(n))
    assert not torch.equal(p0, p1)
    again = build_train_stream(resident_cfg(cache_dir))
    assert torch.equal(again.permutation(1), p1) and torch.equal(again.permutation(0), p0)
    other = build_train_stream(resident_cfg(cache_dir, **{"engine.seed": 1}))
    assert not torch.equal(other.permutation(0), p0)


def test_batches_follow_the_permutation_and_deliver_labels(cache_dir, resident_cfg):
    s = build_train_stream(resident_cfg(cache_dir, **{"data.crop_min_scale": 1.0}))
    perm = s.permutation(0)
    x, y = s.batch(2)
    idx = perm[128:192]
    assert torch.equal(y, s.labels[idx])
    # Full-area crops (scale 1): every output is its source image, flipped or not, and both occur.
    flipped = 0
    for out, src in zip(x, s.images[idx]):
        if torch.equal(out, src.flip(-1)) and not torch.equal(out, src):
            flipped += 1
        else:
            assert torch.equal(out, src)
    assert 0 < flipped < 64


def test_augmentation_shapes_and_ranges(cache_dir, resident_cfg):
    s = build_train_stream(resident_cfg(cache_dir, **{"data.img_size": 16, "model.patch_size": 4,
                                                  "data.resident_decode_size": 16}))
    u8, _ = s.batch(0)
    assert u8.shape == (64, 3, 16, 16) and u8.dtype == torch.uint8
    x, y = next(s)
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    lo, hi = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)), normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))
    assert bool((x >= lo - 1e-5).all()) and bool((x <= hi + 1e-5).all())
    # Random crops differ from batch to batch, and the same batch index redraws the same crops.
    assert torch.equal(s.batch(0)[0], u8) and not torch.equal(s.batch(1)[0], u8)


def test_resume_mid_epoch_is_bit_exact(cache_dir, resident_cfg):
    cfg = resident_cfg(cache_dir, **{"data.class_subset": 20})  # ~500 images: 7 batches an epoch
    a = build_train_stream(cfg)
    assert a.batches_per_epoch < 10
    for _ in range(5):
        next(a)
    sd = a.state_dict()
    tail = [next(a) for _ in range(8)]  # crosses into the next epoch
    assert a.epoch >= 1
    b = build_train_stream(cfg)
    b.load_state_dict(sd)
    for (xa, ya), (xb, yb) in zip(tail, (next(b) for _ in range(8))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(DataError, match="source"):
        b.load_state_dict({**sd, "source": "wds"})
    with pytest.raises(DataError, match="resident images"):
        build_train_stream(resident_cfg(cache_dir, **{"data.class_subset": 30})).load_state_dict(sd)


def test_config_validates_resident_fields():
    from ldae_fast.config import ConfigError

    with pytest.raises(ConfigError, match="data.epoch_size"):
        build_config("demo", {"data.source": "resident"})
    with pytest.raises(ConfigError, match="data.class_subset"):
        build_config("demo", {"data.class_subset": "1"})
    with pytest.raises(ConfigError, match="data.source"):
        build_config("demo", {"data.source": "ram"})
    with pytest.raises(ConfigError, match="time_budget_s"):
        build_config("demo", {"engine.time_budget_s": "-1"})


def test_trainer_runs_on_resident_data_and_stops_at_the_time_budget(cache_dir, tmp_path, resident_cfg):
    from ldae_fast.engine.loop import train

    over = {"model.encoder_depth": 1, "model.decoder_depth": 1, "model.width": 48, "model.num_heads": 2,
            "data.batch_size": 16, "tokenizer.fit_images": 64, "engine.log_every": 1,
            "engine.progress": "false", "engine.out_dir": tmp_path / "run", "optim.ema_decay": 0.0}
    res = train(resident_cfg(cache_dir, **over, **{"engine.steps": 3}))
    assert res.steps == 3 and all(torch.isfinite(torch.tensor(v)) for _, v in res.losses)
    over["engine.out_dir"] = tmp_path / "budget"
    res = train(resident_cfg(cache_dir, **over, **{"engine.steps": 100000, "engine.time_budget_s": 0.5}))
    assert 1 <= res.steps < 100000
    assert res.checkpoint is not None and res.checkpoint.name == f"step_{res.steps:08d}"
    assert res.losses[-1][0] == res.steps
