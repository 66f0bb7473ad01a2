"""Fine-tuning over the stream (eval/finetune_stream.py): kill -9 and rerun ends bit-identical;
2 gloo ranks (DDP, less accumulation) equal one rank within float tolerance; clips with the
Kinetics recipe's repeated augmentation and dropout run."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from stream_harness import kill_9_then_rerun, run_harness

HARNESS = Path(__file__).parent / "finetune_harness.py"
# 2 ranks sum the same per-micro-batch gradients in another order (DDP's all-reduce); after 9
# AdamW steps the weights agree to float32 rounding amplified by the optimizer's normalisation.
RTOL, ATOL = 1e-4, 1e-5


def _harness(root, out, *args):
    return run_harness(HARNESS, root, out, *args, timeout=600)


@pytest.fixture(scope="module")
def ref(stream_shards, tmp_path_factory):
    """The uninterrupted one-rank run every other run is compared with."""
    return _harness(stream_shards, tmp_path_factory.mktemp("ref") / "ref.pt")


def _weights(res):
    return {k: v for k, v in res.items() if k.startswith(("model.", "ema."))}


def _weights_close(res, ref):
    w, r = _weights(res), _weights(ref)
    for k in r:
        torch.testing.assert_close(w[k], r[k], rtol=RTOL, atol=ATOL, msg=k)


def test_kill_9_then_rerun_is_bit_identical(stream_shards, ref, tmp_path):
    step, res = kill_9_then_rerun(HARNESS, stream_shards, tmp_path, "finetune-*.pt", limit_s=300, timeout=600)
    assert int(res["resumed_from"]) == step
    w, r = _weights(res), _weights(ref)
    assert w.keys() == r.keys() and len(w) > 20
    for k in r:
        assert torch.equal(w[k], r[k]), k
    for k in ("top1", "ema_top1", "last_loss"):
        assert torch.equal(res[k], ref[k]), k
    # The classifier moved far from its init (std 2e-5): the comparison is not of two fresh heads.
    assert ref["model.head.weight"].std() > 100 * 2e-5


def test_two_ranks_equal_one_rank(stream_shards, ref, tmp_path):
    """Micro-batches of 2 (halves of each reader's share of 4): 8 per step on one rank, 4 per rank
    on two."""
    two = _harness(stream_shards, tmp_path / "two.pt", "--world", "2", "--workers", "1")
    assert int(two["accumulation"]) == 4 and int(ref["accumulation"]) == 8
    assert int(two["val_images"]) == int(ref["val_images"]) == 20
    _weights_close(two, ref)
    torch.testing.assert_close(two["last_loss"], ref["last_loss"], rtol=1e-5, atol=1e-6)


def test_two_ranks_equal_one_rank_with_micro_batches_across_readers(stream_shards, tmp_path):
    """Micro-batches of 8 (two readers' shares): 2 per step on one rank, 1 per rank on two."""
    one = _harness(stream_shards, tmp_path / "one8.pt", "--micro", "8")
    two = _harness(stream_shards, tmp_path / "two8.pt", "--micro", "8", "--world", "2")
    assert int(one["accumulation"]) == 2 and int(two["accumulation"]) == 1
    _weights_close(two, one)


def test_resume_on_another_rank_count(stream_shards, ref, tmp_path):
    """Positions are per logical reader and micro-batches are defined on the readers: a fine-tune
    stopped on 1 rank continues on 2 with the same steps (float sums in another order)."""
    ck = tmp_path / "ck"
    part = _harness(stream_shards, tmp_path / "part.pt", "--ckpt", str(ck), "--stop-after", "4")
    assert int(part["stopped_at"]) == 4
    res = _harness(stream_shards, tmp_path / "rest.pt", "--ckpt", str(ck), "--world", "2")
    assert int(res["resumed_from"]) == 4
    _weights_close(res, ref)


def test_another_micro_batch_is_another_run(stream_shards, tmp_path):
    """The micro-batch keys the per-piece draws (mixup, erasing, drop path), so it is part of the
    checkpoint's fingerprint: a rerun with another split does not resume the old one."""
    ck = tmp_path / "ck"
    part = _harness(stream_shards, tmp_path / "part.pt", "--ckpt", str(ck), "--stop-after", "2")
    assert int(part["stopped_at"]) == 2
    res = _harness(stream_shards, tmp_path / "rest.pt", "--ckpt", str(ck), "--micro", "4", "--stop-after", "1")
    assert int(res["stopped_at"]) == 1
    assert len(list(ck.glob("finetune-*.pt"))) == 2


def _write_clip_split(root: Path, split: str, shards: int, per_shard: int, frames: int = 6, size: int = 20,
                      seed: int = 0) -> None:
    """Clip shards (KEY.frames.npy + KEY.cls, data/video.py's layout) of moving shapes."""
    from ldae_fast.data.video import make_moving_shapes

    clips, labels = make_moving_shapes(shards * per_shard, 4, frames, size, seed=seed)
    n = 0
    for s in range(shards):
        with tarfile.open(root / f"{split}-{s:06d}.tar", "w") as tar:
            for _ in range(per_shard):
                buf = io.BytesIO()
                np.save(buf, clips[n].permute(1, 2, 3, 0).numpy())
                for name, data in ((f"c{n:05d}.frames.npy", buf.getvalue()),
                                   (f"c{n:05d}.cls", str(int(labels[n])).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1


def test_clips_fine_tune_with_repeated_views(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    _write_clip_split(root, "train", 4, 6, seed=3)
    _write_clip_split(root, "val", 1, 8, seed=4)
    res = _harness(root, tmp_path / "video.pt", "--video")
    assert int(res["val_images"]) == 8 and int(res["steps"]) == 3 * (24 * 2 // 16)
    assert torch.isfinite(res["last_loss"])
    assert any(k.startswith("model.encoder.patch_embed.proj") for k in res)
    assert res["model.head.weight"].std() > 10 * 2e-5
