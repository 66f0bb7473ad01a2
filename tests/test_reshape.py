"""Resume on another rank count, micro-batch or accumulation (engine/reshape.py, data/placement.py).

The interrupted epoch's samples: those the old ranks consumed plus those the new ranks read must
be the epoch's samples, each once (up to the dropped tail of less than one global micro-batch).
The 2-rank legs (2 -> 1 -> 2) run under torchrun in tests/test_ddp.py.
"""

import json
from collections import Counter

import pytest
import torch

from ldae_fast.config import build_config
from ldae_fast.data import build_train_stream
from ldae_fast.data.placement import Placement
from ldae_fast.engine import checkpoint as ck
from ldae_fast.engine.loop import ResumeMismatch, check_resume_fits, train
from ldae_fast.engine.reshape import ResumePlan

TINY = {
    "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
    "data.img_size": "16", "data.synthetic_images": "64", "tokenizer.fit_images": "32",
    "engine.kernels": "reference", "engine.log_every": "1", "engine.progress": "false", "optim.blr": "1e-3",
    "optim.warmup_epochs": "0.5", "eval.probe": "false", "eval.figure": "false", "optim.ema_decay": "0.9",
    "data.crop_min_scale": "1", "data.hflip": "false", "engine.deterministic": "true",
}


def _cfg(out, **over):
    return build_config("demo", {**TINY, "engine.out_dir": str(out), **{k: str(v) for k, v in over.items()}})


@pytest.mark.parametrize("n", [64, 70])
@pytest.mark.parametrize("old,new", [((2, 4), (1, 8)), ((1, 8), (2, 4)), ((2, 4), (3, 2)), ((2, 2), (1, 3))])
def test_placement_resplits_the_rest_of_the_epoch(n, old, new):
    (r0, b0), (r1, b1) = old, new
    olds = [Placement(n, b0, r0, r) for r in range(r0)]
    j = 3  # batches every old rank handed out
    seen = [p + i for pl in olds for k in range(j) for p in [pl.locate(k)[1]] for i in range(b0)]
    news = [Placement(n, b1, r1, r) for r in range(r1)]
    starts = {pl.load_state_dict({**olds[0].state_dict(j), "batches": j}) for pl in news}
    assert starts == {(0, True)}
    k = 0
    while news[0].locate(k)[0] == 0:
        seen += [pl.locate(k)[1] + i for pl in news for i in range(b1)]
        k += 1
    c = Counter(seen)
    assert max(c.values()) == 1  # none twice
    assert sorted(c) == list(range(len(seen)))  # none skipped: a prefix of the permutation
    assert n - len(seen) < r1 * b1  # only the tail of less than one global micro-batch is dropped
    # The next epoch is a whole one, split the usual way.
    assert [news[0].locate(k + i) for i in range(2)] == [(1, 0), (1, r1 * b1)]
    # A same-shape resume of the moved run continues exactly where it was.
    again = Placement(n, b1, r1, 0)
    assert again.load_state_dict({**news[0].state_dict(k - 1), "batches": k - 1}) == (k - 1, False)
    assert again.locate(k) == news[0].locate(k)


def _images_of_epoch(cfg, rank, world, sd=None, limit=None):
    """(label, image bytes) of every sample the stream hands out until its epoch changes."""
    s = build_train_stream(cfg, rank=rank, world_size=world)
    if sd is not None:
        s.load_state_dict(sd)
    out = []
    while s.epoch == 0 and (limit is None or len(out) < limit):
        x, y = next(s)
        out += [(int(lab), img.numpy().tobytes()) for img, lab in zip(x, y)]
    return out, s


def test_synthetic_stream_two_ranks_to_one_sees_each_sample_of_the_epoch_once(tmp_path):
    two = _cfg(tmp_path, **{"data.batch_size": 4})
    one = _cfg(tmp_path, **{"data.batch_size": 8})
    # Two ranks read 3 batches each, then the run moves to one rank with micro-batch 8.
    seen, states = [], []
    for r in range(2):
        got, s = _images_of_epoch(two, r, 2, limit=12)
        seen += got
        states.append(s.state_dict())
    assert states[0]["consumed"] == 24
    rest, _ = _images_of_epoch(one, 0, 1, sd={**states[0]})
    whole, _ = _images_of_epoch(one, 0, 1)  # the epoch as an uninterrupted run reads it
    assert len(seen) == 24 and len(rest) == 40
    assert Counter(seen + rest) == Counter(whole) and len(set(whole)) == 64


def test_same_global_batch_other_split_continues_the_run(tmp_path):
    """1 process, micro 8 -> micro 4 x accumulation 2: the same samples, rows and noise per step,
    so the weights equal the uninterrupted run's up to the order of the gradient sums."""
    over = {"engine.steps": 6, "engine.ckpt_every": 3, "data.batch_size": 8}
    ref = train(_cfg(tmp_path / "a", **over))
    train(_cfg(tmp_path / "b", **{**over, "engine.steps": 3}))
    res = train(_cfg(tmp_path / "b", **{**over, "data.batch_size": 4, "engine.grad_accum": 2,
                                        "engine.resume": "auto"}))
    assert res.steps == 6
    log = (tmp_path / "b" / "metrics.jsonl").read_text()
    ref_curve = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())}
    got_curve = {r["step"]: r["loss"] for r in map(json.loads, log.splitlines())}
    assert sorted(got_curve) == sorted(ref_curve)
    for s in ref_curve:
        assert got_curve[s] == pytest.approx(ref_curve[s], rel=1e-4), s
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(res.model.state_dict()[k], v, rtol=1e-3, atol=1e-5)


def test_another_global_batch_needs_the_flag_and_rederives_the_step(tmp_path, capsys):
    over = {"engine.epochs": 1, "engine.ckpt_every": 4, "data.batch_size": 8}
    train(_cfg(tmp_path, **{**over, "engine.steps": 4}))  # 4 steps of 8 images: 32 images seen
    with pytest.raises(ResumeMismatch, match="global batch changes .*resume_rebatch"):
        train(_cfg(tmp_path, **{**over, "data.batch_size": 4, "engine.resume": "auto"}))
    res = train(_cfg(tmp_path, **{**over, "data.batch_size": 4, "engine.resume": "auto",
                                  "engine.resume_rebatch": "true"}))
    out = capsys.readouterr().out
    assert "32 images seen = step 4 of the old global batch -> step 8 of the new one" in out
    assert res.steps == 16  # one epoch of 64 images at global batch 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 16 and 9 in steps and 5 not in steps
    st = ck.load_state(ck.latest_checkpoint(tmp_path))
    assert st["data"]["epoch"] == 1 and st["data"]["consumed"] == 0  # the epoch's 64 images, once


def test_only_what_cannot_continue_is_refused(tmp_path):
    base = build_config("demo", {"data.batch_size": "8"})
    state = {"world_size": 2, "step": 5, "config": base.to_dict()}
    # DDP or one device, 2 ranks x 8 -> 1 rank x 16: the same global batch, continues.
    plan = check_resume_fits(state, tmp_path, build_config("demo", {"data.batch_size": "16"}), world=1)
    assert isinstance(plan, ResumePlan) and plan.moved and plan.step == 5 and "re-split" in plan.note
    # Another model: what would be needed is named.
    with pytest.raises(ResumeMismatch, match=r"another model \(model.width 96 -> 192"):
        check_resume_fits(state, tmp_path, build_config("demo", {"data.batch_size": "16", "model.width": "192"}), 1)
    # DeepSpeed with the whole state beside its shards (engine.ckpt_consolidated, the default):
    # any rank count, stage or backend. Without it: the rank count and stage that wrote it.
    ds = build_config("demo", {"data.batch_size": "8", "engine.backend": "deepspeed"})
    whole = {"model": {"w": torch.zeros(1)}, "optimizer": {"state": {}, "param_groups": []}}
    ds_one = build_config("demo", {"data.batch_size": "16", "engine.backend": "deepspeed", "engine.zero_stage": "3"})
    for target, world in ((build_config("demo", {"data.batch_size": "16"}), 1), (ds_one, 1), (base, 2)):
        assert check_resume_fits({**state, **whole, "config": ds.to_dict()}, tmp_path, target, world).step == 5
        with pytest.raises(ResumeMismatch, match="ZeRO-2 state sharded over 2 ranks without the whole model.*"
                                                 "resume it with engine.backend=deepspeed, zero_stage 2 on 2 ranks"):
            check_resume_fits({**state, "model": None, "optimizer": None, "config": ds.to_dict()}, tmp_path,
                              target, world)
    # Its own shape reads its own files; a single-device state loads into DeepSpeed as it is.
    assert check_resume_fits({**state, "model": None, "config": ds.to_dict()}, tmp_path, ds, 2).step == 5
    assert check_resume_fits({**state, **whole}, tmp_path, ds, 2).step == 5
