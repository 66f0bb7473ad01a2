"""Data pipeline: transforms, synthetic set, WebDataset reader and stream, shard writer."""

from __future__ import annotations

import io
import logging
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tar as _write_tar
from PIL import Image

from ldae_fast.config import build_config
from ldae_fast.data import (
    DataError,
    build_eval_arrays,
    build_train_stream,
    crop_resize_flip,
    denormalize,
    eval_resize_size,
    eval_transform,
    make_synthetic,
    normalize,
    sample_crop_box,
    synthetic_split,
    to_rgb,
    train_transform,
    write_shards,
)
from ldae_fast.data import shards as shards_mod
from ldae_fast.data.badsamples import BadSampleCounter
from ldae_fast.data.eval_arrays import read_raw_labels
from ldae_fast.data.tar import iter_shard
from ldae_fast.data.transforms import (
    CropBox,
    crop_resize_flip_batch,
    decode_jpegs,
    generator_for,
    single_thread,
)
from ldae_fast.data.urls import brace_expand, expand_urls


# Helpers -------------------------------------------------------------------------------------
def _jpeg(size: int = 8, mode: str = "RGB", seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _id_shards(tmp: Path, n_shards: int, per_shard: int, bad: dict[int, str] | None = None) -> str:
    """Shards whose .cls is a unique sample id, so a stream's labels say which samples it read.
    `bad`: id -> 'corrupt' (undecodable .jpg) or 'nocls' (no label member)."""
    good = _jpeg(8)
    bad = bad or {}
    for s in range(n_shards):
        samples = []
        for k in range(per_shard):
            i = s * per_shard + k
            parts = {"jpg": good, "cls": str(i).encode()}
            if bad.get(i) == "corrupt":
                parts["jpg"] = good[:40] + b"\x00garbage" * 20
            elif bad.get(i) == "nocls":
                del parts["cls"]
            samples.append((f"s{i:05d}", parts))
        _write_tar(tmp / f"ids-{s:03d}.tar", samples)
    return str(tmp / ("ids-{000..%03d}.tar" % (n_shards - 1)))


def _wds_cfg(pattern: str, **over: object):
    o = {"data.source": "wds", "data.train_shards": pattern, "data.val_shards": pattern,
         "data.img_size": "8", "data.batch_size": "8", "data.epoch_size": "96",
         "data.shuffle_buffer": "10", "data.num_workers": "0"}
    o.update({k: str(v) for k, v in over.items()})
    return build_config("demo", o)


def _take(stream, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


# Transforms ----------------------------------------------------------------------------------
def test_normalize_roundtrip():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    y = normalize(x)
    assert y.dtype == torch.float32
    assert torch.allclose(denormalize(y) * 255, x.float(), atol=1e-3)
    assert torch.allclose(normalize(x.float() / 255), y, atol=1e-5)


def test_to_rgb_converts_every_mode():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent: must become white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    for mode in ("L", "P", "LA", "CMYK", "I;16", "RGBA", "1"):
        img = Image.new("RGB", (6, 4), (200, 100, 50)).convert(mode)
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == (6, 4), mode
    pal = Image.new("P", (4, 4), 3)
    pal.info["transparency"] = 3
    assert to_rgb(pal).getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_train_transform_modes_and_seeding(mode):
    data = _jpeg(40, mode)
    a = train_transform(data, 16, (0.2, 1.0), gen=generator_for(1, 2))
    b = train_transform(data, 16, (0.2, 1.0), gen=generator_for(1, 2))
    c = train_transform(data, 16, (0.2, 1.0), gen=generator_for(1, 3))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    if mode == "L":
        assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])


def test_eval_transform_rule():
    assert eval_resize_size(32) == 32 and eval_resize_size(64) == 64
    assert eval_resize_size(224) == 256 and eval_resize_size(256) == 293
    img = Image.fromarray(torch.randint(0, 256, (24, 24, 3), dtype=torch.uint8).numpy())
    # Small target, same size: the whole image, unchanged.
    assert torch.equal(eval_transform(img, 24), torch.from_numpy(np.array(img)).permute(2, 0, 1))
    wide = Image.new("L", (80, 40), 128)
    out = eval_transform(wide, 32)
    assert out.shape == (3, 32, 32) and int(out.float().mean().round()) == 128


def test_random_resized_crop_batch_draws_box_then_flip_per_image():
    """The one augmentation function keeps the draws of the per-image recipe it replaced (box,
    then flip, image by image) and leaves the generator where that recipe left it."""
    from ldae_fast.data.transforms import random_resized_crop_batch, sample_flip

    x = torch.randint(0, 256, (5, 3, 12, 10), dtype=torch.uint8)
    g1, g2 = generator_for(7, 1), generator_for(7, 1)
    got = random_resized_crop_batch(x, 8, (0.3, 1.0), True, g1)
    boxes, flips = [], []
    for _ in range(5):
        boxes.append(sample_crop_box(10, 12, (0.3, 1.0), gen=g2))
        flips.append(sample_flip(True, g2))
    want = crop_resize_flip_batch(x, torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips), 8)
    assert torch.equal(got, want) and any(flips) and not all(flips)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_random_resized_crop_batch_full_crop_is_the_identity():
    from ldae_fast.data.transforms import random_resized_crop_batch

    x = torch.randn(6, 3, 12, 12)
    same = random_resized_crop_batch(x, 12, (1.0, 1.0), False, torch.Generator().manual_seed(0))
    assert torch.allclose(same, x, atol=1e-5)
    out = random_resized_crop_batch(x, 12, (0.08, 1.0), True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.allclose(out, x)


def test_sample_crop_box_respects_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        box = sample_crop_box(64, 48, (0.3, 1.0), gen=g)
        assert 0 <= box.left and box.left + box.width <= 64
        assert 0 <= box.top and box.top + box.height <= 48
        frac = box.width * box.height / (64 * 48)
        assert 0.25 <= frac <= 1.0
        assert 0.7 <= box.width / box.height <= 1.45
    # Impossible aspect for a very thin image: centred fallback inside the image.
    box = sample_crop_box(200, 4, (0.9, 1.0), gen=g)
    assert box.left + box.width <= 200 and box.height == 4


def test_tensor_crop_flip_matches_slicing():
    x = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    full = torch.tensor([[0, 0, 20, 20]] * 4, dtype=torch.float32)
    flips = torch.tensor([False, True, False, True])
    y = crop_resize_flip_batch(x, full, flips, 20)
    assert torch.equal(y[0], x[0]) and torch.equal(y[1], x[1].flip(-1))
    part = torch.tensor([[5, 3, 10, 10]] * 4, dtype=torch.float32)
    y = crop_resize_flip_batch(x, part, torch.zeros(4, dtype=torch.bool), 10)
    assert torch.equal(y[2], x[2, :, 3:13, 5:15])
    box = CropBox(5, 3, 10, 12)
    z = crop_resize_flip(x[0], CropBox(5, 3, 10, 10), 10, True)
    assert torch.equal(z, x[0, :, 3:13, 5:15].flip(-1))
    small = crop_resize_flip(x[0].float(), box, 5, False)
    assert small.shape == (3, 5, 5) and small.dtype == torch.float32


def test_gpu_decode_path_runs_on_cpu():
    datas = [_jpeg(12), _jpeg(20, "L"), b"\xff\xd8\xff" + b"\x00" * 50]
    out = decode_jpegs([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], "cpu")
    assert out[0].shape == (3, 12, 12) and out[1].shape == (3, 20, 20) and out[2] is None
    ref = torch.from_numpy(np.array(Image.open(io.BytesIO(datas[0])).convert("RGB")))
    assert (out[0].permute(1, 2, 0).int() - ref.int()).abs().float().mean() < 3


def test_gpu_decode_stream_falls_back_and_its_logic_runs_on_cpu(tmp_path):
    pattern = _id_shards(tmp_path, 1, 24, bad={5: "corrupt"})
    cfg = _wds_cfg(pattern, **{"data.gpu_decode": "true", "data.shuffle_buffer": 1,
                               "data.max_bad_fraction": 0.1})
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="gpu_decode"):
            s = build_train_stream(cfg)
        assert not s.gpu
        y = torch.cat([y for _, y in _take(s, 2)])
        assert y.tolist() == [i for i in range(17) if i != 5]
    # The GPU branch (header-only parse in the worker, decode + crop + flip in the main
    # process) with the CPU standing in for the GPU. A sample that fails to decode there is
    # replaced, image and label, by another of its batch, so the batch keeps its size.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = build_train_stream(cfg)
    s.gpu, s.device = True, torch.device("cpu")
    batches = _take(s, 2)
    for x, _ in batches:
        assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()
    labels = torch.cat([y for _, y in batches]).tolist()
    assert 5 not in labels and set(labels) >= set(range(16)) - {5}
    assert s.stats()["bad"] == 1


# Synthetic set -------------------------------------------------------------------------------
def test_synthetic_deterministic_balanced_and_fast():
    make_synthetic(16, 8, 32)  # warm-up
    t0 = time.process_time()
    x, y = make_synthetic(2048, 8, 32)
    cpu = time.process_time() - t0
    assert cpu < 2.0, f"generating 2048 32x32 images took {cpu:.2f}s of CPU"
    assert x.shape == (2048, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(y.bincount(minlength=8), torch.full((8,), 256))
    x2, y2 = make_synthetic(10, 8, 32, start=100)  # any index range on its own
    assert torch.equal(x2, x[100:110]) and torch.equal(y2, y[100:110])
    assert x.float().std() > 30  # not blank
    xa, ya = make_synthetic(60, 12, 16)
    assert set(ya.tolist()) == set(range(12)) and xa.shape == (60, 3, 16, 16)


def test_synthetic_splits_are_disjoint():
    tr, ytr = synthetic_split("train", 128, 4, 16)
    va, yva = synthetic_split("val", 128, 4, 16)
    assert len(va) == 32 and set(yva.tolist()) == {0, 1, 2, 3}
    same = (tr.flatten(1)[:, None] == va.flatten(1)[None]).all(-1)
    assert not same.any()


def test_synthetic_stream_epoch_and_exact_resume():
    cfg = build_config("demo", {"data.synthetic_images": "256", "data.batch_size": "32"})
    a = build_train_stream(cfg)
    ref = _take(a, 12)  # 8 batches per epoch: crosses into epoch 1
    first_epoch = torch.cat([y for _, y in ref[:8]])
    assert torch.equal(first_epoch.bincount(), torch.full((8,), 32))
    assert ref[0][0].shape == (32, 3, 32, 32) and ref[0][0].dtype == torch.float32
    b = build_train_stream(cfg)
    _take(b, 5)
    sd = b.state_dict()
    assert (sd["epoch"], sd["batch"]) == (0, 5)
    # Resume in a fresh stream, with workers this time: the order is keyed on position only.
    cfg2 = build_config("demo", {"data.synthetic_images": "256", "data.batch_size": "32",
                                 "data.num_workers": "2"})
    c = build_train_stream(cfg2)
    c.load_state_dict(sd)
    got = _take(c, 7)
    for (xa, ya), (xc, yc) in zip(ref[5:12], got):
        assert torch.equal(xa, xc) and torch.equal(ya, yc)
    assert c.state_dict()["epoch"] == 1


def test_fewer_images_than_one_global_batch_names_the_field():
    cfg = build_config("demo", {"data.synthetic_images": "48", "data.batch_size": "32"})
    assert build_train_stream(cfg, world_size=1).src.batches_per_epoch == 1
    with pytest.raises(DataError, match=r"data.synthetic_images: 48 images, fewer than one global batch of 64"):
        build_train_stream(cfg, rank=1, world_size=2)


def test_synthetic_eval_arrays():
    cfg = build_config("demo", {"data.synthetic_images": "256"})
    x, y = build_eval_arrays(cfg, "val", max_images=40)
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    x2, _ = build_eval_arrays(cfg, "val", max_images=40)
    assert torch.equal(x, x2)


# Real Tiny ImageNet shards -------------------------------------------------------------------
def test_reads_real_tinyimagenet(tinyimagenet_dir):
    shard = str(tinyimagenet_dir / "val-000000.tar.gz")
    # Ground truth straight from the tar with the standard library.
    truth, modes = [], []
    with tarfile.open(shard) as tar:
        for m in tar:
            if m.name.endswith(".cls"):
                truth.append(int(tar.extractfile(m).read()))
            elif m.name.endswith(".jpg") and len(modes) < 400:
                modes.append(Image.open(io.BytesIO(tar.extractfile(m).read())).mode)
    n_classes = len((tinyimagenet_dir / "classes.tsv").read_text().splitlines())
    assert n_classes == 202 and len(truth) == 5050
    assert [lab for _, lab in read_raw_labels(shard)] == truth
    cfg = build_config("tiny-imagenet", {"data.val_shards": shard, "data.num_workers": "0"})
    x, y = build_eval_arrays(cfg, "val", max_images=400)
    assert x.shape == (400, 3, 64, 64) and y.tolist() == truth[:400]
    gray = [i for i, m in enumerate(modes) if m == "L"]
    assert gray, "expected grayscale JPEGs among the first 400 images"
    img = denormalize(x[gray[0]])
    assert torch.allclose(img[0], img[1], atol=1e-5) and torch.allclose(img[1], img[2], atol=1e-5)
    # The same shard through a pipe: URL reads the same samples.
    cfg_pipe = build_config("tiny-imagenet", {"data.val_shards": f"pipe:cat {shard}"})
    xp, yp = build_eval_arrays(cfg_pipe, "val", max_images=50)
    assert torch.equal(xp, x[:50]) and torch.equal(yp, y[:50])


def test_real_tinyimagenet_train_stream(tinyimagenet_dir):
    pattern = str(tinyimagenet_dir / "train-{000000..000009}.tar.gz")
    cfg = build_config("tiny-imagenet", {"data.train_shards": pattern, "data.num_workers": "0",
                                         "data.batch_size": "32", "data.shuffle_buffer": "64",
                                         "data.img_size": "32"})
    s = build_train_stream(cfg)
    (x, y), (x2, y2) = _take(s, 2)
    assert x.shape == (32, 3, 32, 32) and torch.isfinite(x).all()
    assert y.min() >= 0 and y.max() < 202 and not torch.equal(y, y2)
    assert s.stats() == {"good": 64, "bad": 0}


# Shard writer --------------------------------------------------------------------------------
def _image_folder(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """A tiny ImageFolder; returns file name -> (class index, original bytes if JPEG)."""
    made: dict[str, tuple[int, bytes | None]] = {}
    specs = {
        "zebra": [("z1.jpg", "RGB"), ("z2.jpeg", "L")],
        "cat": [("c1.png", "RGBA"), ("c2.JPG", "RGB"), ("c3.gif", "P")],
        "dog": [("d.1.jpg", "CMYK"), ("d2.bmp", "RGB")],
    }
    classes = sorted(specs)
    for cname, files in specs.items():
        (root / cname).mkdir(parents=True)
        for i, (fn, mode) in enumerate(files):
            img = Image.new("RGB", (12 + i, 10), (40 * i, 90, 200)).convert(mode)
            path = root / cname / fn
            fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP"}[fn.rsplit(".", 1)[1].lower()]
            img.save(path, format=fmt)
            made[fn] = (classes.index(cname), path.read_bytes() if fmt == "JPEG" else None)
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    return made


def test_shard_writer_roundtrip(tmp_path, caplog):
    made = _image_folder(tmp_path / "src")
    with caplog.at_level(logging.WARNING, logger="ldae_fast.data"):
        paths = write_shards(tmp_path / "src", str(tmp_path / "out" / "train-%06d.tar"), max_count=3, seed=1)
    assert "broken.jpg" in caplog.text
    assert len(paths) == 3 and all(Path(p).exists() for p in paths)
    assert (tmp_path / "out" / "classes.tsv").read_text() == "0\tcat\n1\tdog\n2\tzebra\n"
    # Original JPEG bytes are kept; everything else is a JPEG now.
    members: dict[str, bytes] = {}
    for p in paths:
        with tarfile.open(p) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar})
    for fn, (ci, orig) in made.items():
        key = [k for k in members if k.endswith(".cls") and fn.replace(".", "_").rsplit("_", 1)[0] in k]
        assert len(key) == 1, (fn, sorted(members))
        assert int(members[key[0]]) == ci
        jpg = members[key[0][: -len(".cls")] + ".jpg"]
        assert jpg[:3] == b"\xff\xd8\xff"
        if orig is not None:
            assert jpg == orig
    pattern = str(tmp_path / "out" / "train-{000000..000002}.tar")
    cfg = _wds_cfg(pattern)
    x, y = build_eval_arrays(cfg, "train")
    assert x.shape == (7, 3, 8, 8)
    assert sorted(y.tolist()) == sorted(ci for ci, _ in made.values())
    # Same input, same seed: byte-identical shards.
    again = write_shards(tmp_path / "src", str(tmp_path / "out2" / "train-%06d.tar"), max_count=3, seed=1)
    assert [Path(p).read_bytes() for p in again] == [Path(p).read_bytes() for p in paths]


def test_shard_writer_keeps_long_names_and_no_half_shard(tmp_path, monkeypatch):
    # A key past ustar's 100 bytes is written (pax) and read back; a failing write leaves no shard.
    d = tmp_path / "src" / "cat"
    d.mkdir(parents=True)
    long = "x" * 140
    Image.new("RGB", (8, 8), (10, 20, 30)).save(d / f"{long}.png")
    (path,) = write_shards(tmp_path / "src", str(tmp_path / "out" / "s-%03d.tar"))
    assert [r.key for r in iter_shard(path, BadSampleCounter(0.0))] == [f"cat_{long}"]

    def broken_add(tar, name, data):
        raise OSError("disk full")
    monkeypatch.setattr(shards_mod, "_add", broken_add)
    with pytest.raises(OSError, match="disk full"):
        write_shards(tmp_path / "src", str(tmp_path / "out2" / "s-%03d.tar"))
    assert [p.name for p in (tmp_path / "out2").iterdir()] == ["classes.tsv"]


def test_make_shards_cli_gzip(tmp_path, capsys):
    _image_folder(tmp_path / "src")
    rc = shards_mod.main([str(tmp_path / "src"), str(tmp_path / "gz" / "s-%03d.tar"), "--gzip",
                          "--maxcount", "100", "--seed", "3"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "make-shards: 7/8 images" in err or "make-shards: 8/8 images" in err
    assert "wrote 1 shard" in err
    shard = tmp_path / "gz" / "s-000.tar.gz"
    assert shard.read_bytes()[:2] == b"\x1f\x8b"
    assert len(read_raw_labels(str(shard))) == 7
    assert shards_mod.main([str(tmp_path / "nope"), str(tmp_path / "x-%d.tar")]) == 4  # file error


# WebDataset stream ---------------------------------------------------------------------------
def test_two_ranks_read_disjoint_samples(tmp_path):
    pattern = _id_shards(tmp_path, 8, 12)
    cfg = _wds_cfg(pattern)
    seen = []
    for rank in (0, 1):
        s = build_train_stream(cfg, rank=rank, world_size=2)
        # 4 shards x 12 samples per rank = 6 batches of 8: one epoch of this rank.
        seen.append(torch.cat([y for _, y in _take(s, 6)]).tolist())
    assert len(set(seen[0])) == 48 and len(set(seen[1])) == 48
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(96))


def test_wds_resume_is_exact_with_workers(tmp_path):
    pattern = _id_shards(tmp_path, 8, 12)
    cfg = _wds_cfg(pattern, **{"data.num_workers": 2})
    ref = _take(build_train_stream(cfg), 20)  # each worker: 48 samples = 6 batches per epoch
    assert sorted(torch.cat([y for _, y in ref[:12]]).tolist()) == list(range(96))
    b = build_train_stream(cfg)
    _take(b, 9)
    sd = b.state_dict()
    assert sd["batches"] == 9 and len(sd["positions"]) == 2
    c = build_train_stream(cfg)
    c.load_state_dict(sd)
    got = _take(c, 11)
    for (xa, ya), (xc, yc) in zip(ref[9:], got):
        assert torch.equal(ya, yc) and torch.equal(xa, xc)


def test_wds_resume_in_process_and_resampled(tmp_path):
    pattern = _id_shards(tmp_path, 4, 12)
    cfg = _wds_cfg(pattern)
    ref = _take(build_train_stream(cfg), 9)  # 6 batches per epoch
    b = build_train_stream(cfg)
    _take(b, 4)
    c = build_train_stream(cfg)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(ref[4:], _take(c, 5)))
    # Resampled: resuming is re-seeded from the step, deterministic for a given step.
    rcfg = _wds_cfg(pattern, **{"data.resampled": "true"})
    r = build_train_stream(rcfg)
    first = _take(r, 3)
    assert all(torch.equal(a[1], b_[1]) for a, b_ in zip(first, _take(build_train_stream(rcfg), 3)))
    sd = r.state_dict()
    outs = []
    for _ in range(2):
        s = build_train_stream(rcfg)
        s.load_state_dict(sd)
        outs.append(torch.cat([y for _, y in _take(s, 3)]))
    assert torch.equal(outs[0], outs[1]) and sd["batches"] == 3


def test_corrupt_jpeg_is_skipped_and_a_missing_label_pretrains(tmp_path, caplog):
    pattern = _id_shards(tmp_path, 1, 150, bad={37: "corrupt", 90: "nocls"})
    cfg = _wds_cfg(pattern, **{"data.max_bad_fraction": 0.05, "data.shuffle_buffer": 1})
    s = build_train_stream(cfg)
    with caplog.at_level(logging.WARNING, logger="ldae_fast.data"):
        labels = torch.cat([y for _, y in _take(s, 18)])  # 149 good samples -> 18 full batches
    assert s.stats() == {"good": 144, "bad": 1}
    # Pretraining needs no label: the sample without .cls is trained on, with label -1.
    assert 37 not in labels.tolist() and 90 not in labels.tolist() and -1 in labels.tolist()
    assert "s00037" in caplog.text and "ids-000.tar" in caplog.text and "s00090" not in caplog.text


def test_bad_fraction_over_limit_raises(tmp_path):
    pattern = _id_shards(tmp_path, 1, 150, bad={i: "corrupt" for i in range(0, 150, 7)})
    s = build_train_stream(_wds_cfg(pattern, **{"data.shuffle_buffer": 1}))
    with pytest.raises(DataError, match="max_bad_fraction"):
        _take(s, 18)


def test_truncated_shard_is_logged_counted_and_skipped(tmp_path, caplog):
    """Decision: a shard that breaks off is logged (ERROR, with its name and how far it got),
    counted as one bad sample, and reading goes on with the next shard."""
    pattern = _id_shards(tmp_path, 2, 20)
    plain = tmp_path / "ids-001.tar"
    plain.write_bytes(plain.read_bytes()[: plain.stat().st_size // 2])  # cut at a block boundary
    gz = Path(_write_tar(tmp_path / "full.tar.gz", [(f"g{i}", {"jpg": _jpeg(8, seed=i), "cls": b"1"})
                                                      for i in range(40)], gz=True))
    (tmp_path / "cut.tar.gz").write_bytes(gz.read_bytes()[: gz.stat().st_size * 2 // 3])
    counter = BadSampleCounter(1.0)
    with caplog.at_level(logging.ERROR, logger="ldae_fast.data"):
        n_cut = len(list(iter_shard(str(plain), counter)))
        n_gz = len(list(iter_shard(str(tmp_path / "cut.tar.gz"), counter)))
    assert 0 < n_cut < 20 and n_gz < 40 and counter.bad == 2
    assert "ids-001.tar" in caplog.text and "cut.tar.gz" in caplog.text
    # The stream goes on past the cut shard.
    x, y = build_eval_arrays(_wds_cfg(pattern, **{"data.max_bad_fraction": 0.5}), "train")
    assert len(y) == 20 + n_cut and y[:20].tolist() == list(range(20))


def test_unreadable_shards_fail_loudly_not_forever(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 100)
    s = build_train_stream(_wds_cfg(str(tmp_path / "junk.tar")))
    with pytest.raises(DataError, match="no readable sample"):
        _take(s, 1)


def test_url_errors_are_clear(tmp_path):
    assert brace_expand("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert brace_expand("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    _id_shards(tmp_path, 2, 8)
    with pytest.raises(DataError, match=r"ids-\{000..003\}.*2 of 4 .*ids-002.tar"):
        expand_urls(str(tmp_path / "ids-{000..003}.tar"))
    with pytest.raises(DataError, match="expands to no shard"):
        expand_urls(str(tmp_path / "ids-{003..001}.tar"))
    with pytest.raises(DataError, match="empty"):
        expand_urls("")
    counter = BadSampleCounter(1.0)  # a failing pipe: command is counted as a broken shard
    assert list(iter_shard(f"pipe:cat {tmp_path}/missing.tar 2>/dev/null", counter)) == []
    assert counter.bad == 1 and "exited with status 1" in counter.recent[0]
    two = str(tmp_path / "ids-{000..001}.tar")
    with pytest.raises(DataError, match="fewer than 2 rank"):
        build_train_stream(_wds_cfg(two, **{"data.num_workers": 2}), rank=0, world_size=2)
    # Resampling needs no shard per reader.
    assert build_train_stream(_wds_cfg(two, **{"data.num_workers": 2, "data.resampled": "true"}),
                              rank=1, world_size=2).batch_size == 8


def test_single_thread_restores_setting():
    before = torch.get_num_threads()
    with single_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
