"""Video data for DiffMAE: the moving-shapes clips, clip shards (writer -> reader), bad clips,
repeated augmentation, and the config rules around them."""

from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ldae_fast.config import ConfigError, build_config
from ldae_fast.data import build_train_stream
from ldae_fast.data.badsamples import BadSampleCounter
from ldae_fast.data.video import (
    FRAMES_EXT,
    decode_clip,
    iter_video_shard,
    make_moving_shapes,
    write_video_shards,
)

VIDEO = {"data.synthetic_kind": "moving-shapes", "data.num_frames": "8", "diffmae.tubelet": "2",
         "data.synthetic_images": "64", "data.batch_size": "8", "diffmae.mask_ratio": "0.9"}


def test_moving_shapes_are_deterministic_and_independent_of_the_batch():
    a, la = make_moving_shapes(12, 8, 6, 32)
    b, lb = make_moving_shapes(5, 8, 6, 32, start=4)
    assert a.shape == (12, 3, 6, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a[4:9], b) and torch.equal(la[4:9], lb)
    assert torch.equal(la, torch.arange(12) % 8)
    c, _ = make_moving_shapes(12, 8, 6, 32)
    assert torch.equal(a, c)


def test_moving_shapes_move():
    clips, _ = make_moving_shapes(16, 8, 8, 32)
    x = clips.float()
    # Consecutive frames differ by more than the pixel noise alone would make them differ ...
    step = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # (N, T-1)
    assert float(step.min()) > 1.0
    # ... and the first and last frames differ more than neighbours (the objects travel).
    far = (x[:, :, -1] - x[:, :, 0]).abs().mean(dim=(1, 2, 3))
    assert float((far > step.mean(1)).float().mean()) >= 0.75


def _frame_folders(root, clips: dict[str, list[np.ndarray]]):
    for rel, frames in clips.items():
        d = root / rel
        d.mkdir(parents=True)
        for i, fr in enumerate(frames):
            Image.fromarray(fr).save(d / f"f{i:03d}.png")


def _random_clip(rng, T, H=20, W=24):
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(T)]


def test_writer_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    clips = {f"cat{c}/clip{i}": _random_clip(rng, 5) for c in range(2) for i in range(3)}
    _frame_folders(tmp_path / "src", clips)
    paths = write_video_shards(tmp_path / "src", str(tmp_path / "out" / "clips-%03d.tar"), max_count=4)
    assert len(paths) == 2
    again = write_video_shards(tmp_path / "src", str(tmp_path / "out2" / "clips-%03d.tar"), max_count=4)
    assert [open(p, "rb").read() for p in paths] == [open(p, "rb").read() for p in again]
    counter = BadSampleCounter(0.5)
    got = {}
    for p in paths:
        for raw in iter_video_shard(p, counter):
            got[raw.key] = (raw.label, decode_clip(raw.data, 5))
    assert counter.bad == 0 and len(got) == 6
    for rel, frames in clips.items():
        label, clip = got[rel.replace("/", "_")]
        assert label == int(rel[3])
        assert torch.equal(clip, torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2))
    # A window of 2 frames at stride 2 of a 5-frame clip: frames 0 and 2 without a generator.
    raw0 = next(iter_video_shard(paths[0], counter))
    assert torch.equal(decode_clip(raw0.data, 2, 2), got[raw0.key][1][:, 0:3:2])


def _tar_with(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _npy(arr, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def test_bad_clips_are_skipped_and_counted(tmp_path, caplog):
    rng = np.random.default_rng(1)
    good = [np.stack(_random_clip(rng, 8, 16, 16)) for _ in range(6)]
    members = [(f"g{i}.{FRAMES_EXT}", _npy(a)) for i, a in enumerate(good[:3])]
    members += [
        ("bad0.frames.npy", b"\x93NUMPY garbage"),                                    # unreadable
        ("bad1.frames.npy", _npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)),  # pickled objects
        ("bad2.frames.npy", _npy(np.zeros((2, 16, 16, 3), np.uint8))),                 # too few frames
        ("bad3.frames.npy", _npy(np.zeros((8, 16, 16, 3), np.float32))),               # wrong dtype
        ("bad4.jpg", b"not a clip"),                                                   # no frames member
        ("bad5.frames.npy", _npy_header_bytes((4096, 8000, 8000, 3)) + bytes(64)),    # header lies
    ]
    members += [(f"h{i}.{FRAMES_EXT}", _npy(a)) for i, a in enumerate(good[3:])]
    shard = tmp_path / "clips-000.tar"
    _tar_with(shard, members)
    cfg = build_config("diffmae-video-demo", {
        "data.source": "wds-video", "data.train_shards": str(shard), "data.epoch_size": "6",
        "data.batch_size": "3", "data.num_frames": "8", "data.img_size": "16", "data.max_bad_fraction": "1.0",
        "data.shuffle_buffer": "1", "data.repeated_aug": "1"})
    stream = build_train_stream(cfg)
    with caplog.at_level(logging.WARNING, logger="ldae_fast.data"):
        x1, _ = next(stream)
        x2, _ = next(stream)
    assert x1.shape == (3, 3, 8, 16, 16)
    assert stream.stats()["bad"] == 6  # bad0..3 and bad5 cannot be decoded, bad4 has no frames member
    assert "'bad1': cannot decode clip" in caplog.text and "'bad5': cannot decode clip" in caplog.text
    assert "clips-000.tar" in caplog.text and "'bad4': no .frames.npy member" in caplog.text
    # What came through is the six good clips, in some order (crops of 16 px frames at scale 1).
    assert not torch.isnan(torch.cat([x1, x2])).any()


def test_repeated_augmentation_pairs_one_clip_with_different_crops():
    cfg = build_config("diffmae-video-demo", {**VIDEO, "data.repeated_aug": "4"})
    x, y = next(build_train_stream(cfg))
    assert x.shape[0] == 8
    assert torch.equal(y[0::4], y[1::4]) and torch.equal(y[0::4], y[3::4])
    assert not torch.equal(x[0], x[1])  # same clip, other crop or flip


@pytest.mark.parametrize("over, field", [
    ({"data.repeated_aug": "2"}, "data.repeated_aug"),                            # image source
    ({"data.num_frames": "8", "data.synthetic_kind": "moving-shapes",
      "data.batch_size": "6", "data.repeated_aug": "4", "objective.method": "diffmae"}, "data.batch_size"),
    ({"data.synthetic_kind": "moving-shapes"}, "data.num_frames"),
    ({"data.num_frames": "8", "data.synthetic_kind": "moving-shapes", "diffmae.tubelet": "3"}, "diffmae.tubelet"),
])
def test_video_config_errors_name_the_field(over, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config("diffmae-demo", over)


def test_video_needs_diffmae():
    with pytest.raises(ConfigError, match="objective.method"):
        build_config("demo", {"data.num_frames": "8", "data.synthetic_kind": "moving-shapes"})


def test_write_video_shards_cli(tmp_path):
    from ldae_fast.cli import main
    rng = np.random.default_rng(2)
    _frame_folders(tmp_path / "src", {f"clip{i}": _random_clip(rng, 3) for i in range(3)})
    assert main(["write-video-shards", str(tmp_path / "src"), str(tmp_path / "out" / "c-%03d.tar")]) == 0
    raws = list(iter_video_shard(str(tmp_path / "out" / "c-000.tar"), BadSampleCounter(0.0)))
    assert sorted(r.key for r in raws) == ["clip0", "clip1", "clip2"] and all(r.label == -1 for r in raws)
    assert main(["write-video-shards", str(tmp_path / "missing"), str(tmp_path / "o" / "c-%03d.tar")]) == 4  # a missing source is a file error, as in make-shards


def test_figure_clips_from_shards_skip_bad_ones(tmp_path):
    from ldae_fast.data.video import video_eval_clips
    rng = np.random.default_rng(3)
    good = [np.stack(_random_clip(rng, 8, 24, 20)) for _ in range(3)]
    shard = tmp_path / "val-000.tar"
    _tar_with(shard, [("a.frames.npy", b"junk")] + [(f"g{i}.{FRAMES_EXT}", _npy(a)) for i, a in enumerate(good)])
    cfg = build_config("diffmae-video-demo", {
        "data.source": "wds-video", "data.train_shards": str(shard), "data.val_shards": str(shard),
        "data.epoch_size": "3", "data.img_size": "16"})
    clips = video_eval_clips(cfg, 2)
    assert clips.shape == (2, 3, 8, 16, 16) and clips.dtype == torch.float32


def _npy_header_bytes(shape, descr="|u1", fortran=False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue()


def test_a_header_claiming_a_huge_clip_allocates_nothing():
    import time
    import tracemalloc
    # 4096 frames of 8000 x 8000 pass the frame and pixel bounds; np.load would ask for 732 GiB.
    data = _npy_header_bytes((4096, 8000, 8000, 3)) + bytes(1000)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError, match="bytes after its header"):
            decode_clip(data, 8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and time.perf_counter() - t0 < 1.0


def test_truncated_fortran_and_pickled_payloads_are_refused():
    arr = np.random.default_rng(4).integers(0, 256, (8, 6, 5, 3), dtype=np.uint8)
    good = _npy(arr)
    assert torch.equal(decode_clip(good, 8), torch.from_numpy(arr).permute(3, 0, 1, 2))
    with pytest.raises(ValueError, match="bytes after its header"):
        decode_clip(good[:-1], 8)
    with pytest.raises(ValueError, match="bytes after its header"):
        decode_clip(good + b"\0", 8)
    with pytest.raises(ValueError, match="Fortran"):
        decode_clip(_npy_header_bytes(arr.shape, fortran=True) + arr.tobytes(order="F"), 8)


class _Tripwire:
    fired = False

    def __reduce__(self):
        return (_trip, ())


def _trip():
    _Tripwire.fired = True
    return "fired"


def test_a_pickle_behind_a_uint8_header_is_never_unpickled():
    import pickle
    body = pickle.dumps(np.array([_Tripwire()], dtype=object))
    assert np.load(io.BytesIO(_npy(np.array([_Tripwire()], dtype=object), allow_pickle=True)),
                   allow_pickle=True)[0] == "fired"  # the payload does run code where pickles load
    _Tripwire.fired = False
    with pytest.raises(ValueError, match="not uint8"):
        decode_clip(_npy(np.array([_Tripwire()], dtype=object), allow_pickle=True), 1)
    # A header that passes the dtype and shape checks, followed by pickle bytes: too few or too
    # many bytes is a bad sample; exactly enough bytes are frames (noise), never objects.
    for shape in [(8, 2, 2, 3), (1, 1, len(body), 1)]:
        data = _npy_header_bytes(shape) + body
        try:
            clip = decode_clip(data, 1)
        except ValueError as e:
            assert "bytes after its header" in str(e)
        else:
            assert clip.dtype == torch.uint8
    assert not _Tripwire.fired


@pytest.mark.parametrize("preset", ["diffmae-video-vitl", "diffmae-video-vitl14"])
def test_video_presets_keep_the_shuffle_buffer_in_memory(preset):
    cfg = build_config(preset, {"data.train_shards": "x-{000000..000001}.tar"})
    d = cfg.data
    # A long stored clip (300 frames of 240 x 320 x 3) in every slot of every worker's buffer.
    per_rank = d.shuffle_buffer * max(1, d.num_workers) * 300 * 240 * 320 * 3
    assert d.shuffle_buffer <= 64 and per_rank < 16e9


def test_frames_are_read_in_natural_order(tmp_path):
    from ldae_fast.data.video import natural_key
    names = ["f10.png", "f2.png", "f1.png", "f01.png", "g1.png", "f100.png", "f9.png"]
    assert sorted(names, key=natural_key) == ["f01.png", "f1.png", "f2.png", "f9.png", "f10.png",
                                              "f100.png", "g1.png"]
    # Frame i carries the value i: the written clip must come back in 1, 2, ..., 12 order.
    d = tmp_path / "src" / "clip"
    d.mkdir(parents=True)
    for i in range(1, 13):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(d / f"frame{i}.png")
    (p,) = write_video_shards(tmp_path / "src", str(tmp_path / "out" / "c-%03d.tar"))
    (raw,) = iter_video_shard(p, BadSampleCounter(0.0))
    clip = decode_clip(raw.data, 12)
    assert clip[0, :, 0, 0].tolist() == list(range(1, 13))


def test_clip_folders_mapping_to_one_key_fail_naming_both(tmp_path):
    from ldae_fast.cli import main
    from ldae_fast.data.video import ClipKeyClash
    rng = np.random.default_rng(5)
    _frame_folders(tmp_path / "src", {"x y": _random_clip(rng, 2), "x_y": _random_clip(rng, 2)})
    out = tmp_path / "out" / "c-%03d.tar"
    with pytest.raises(ClipKeyClash, match=r"x y.* and .*x_y.*'x_y'"):
        write_video_shards(tmp_path / "src", str(out))
    assert not list((tmp_path / "out").glob("*.tar*"))
    assert main(["write-video-shards", str(tmp_path / "src"), str(out)]) == ClipKeyClash.exit_code == 5


def test_long_keys_are_written_and_a_failed_shard_leaves_no_temp_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    long = "c" * 150
    clips = {f"cls/{long}": _random_clip(rng, 2), "cls/short": _random_clip(rng, 2)}
    _frame_folders(tmp_path / "src", clips)
    paths = write_video_shards(tmp_path / "src", str(tmp_path / "out" / "c-%03d.tar"))
    again = write_video_shards(tmp_path / "src", str(tmp_path / "out2" / "c-%03d.tar"))
    assert [open(p, "rb").read() for p in paths] == [open(p, "rb").read() for p in again]
    keys = {r.key for p in paths for r in iter_video_shard(p, BadSampleCounter(0.0))}
    assert keys == {f"cls_{long}", "cls_short"}

    def broken_add(tar, name, data):
        raise OSError("disk full")
    from ldae_fast.data import shards
    monkeypatch.setattr(shards, "_add", broken_add)  # the one writer loop both shard writers use
    with pytest.raises(OSError, match="disk full"):
        write_video_shards(tmp_path / "src", str(tmp_path / "out3" / "c-%03d.tar"))
    assert [p.name for p in (tmp_path / "out3").iterdir()] == ["classes.tsv"]
