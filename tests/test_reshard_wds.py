"""Shard data (data.source=wds) resumed on another rank or worker count (data/shard_layout.py).

The shards' .cls labels are unique sample ids, so the labels a stream hands out say which samples
it read. Within the interrupted epoch every sample must be read exactly once over all legs; the
epochs after it follow the new layout, i.e. each rank reads what an uninterrupted run of the new
shape reads in them. The ranks of a leg are TrainStreams of one process (the stream needs no
process group); the 2-rank legs under torchrun are in tests/test_ddp.py.
"""

import random
from collections import Counter

import pytest

from ldae_fast.data import build_train_stream
from ldae_fast.data import sources as sources_mod
from ldae_fast.data.shard_layout import _slot_left
from ldae_fast.data.shuffle import shuffled
from ldae_fast.engine.reshape import ResumePlan

# Shards of unequal size, so readers drift apart and a batch may straddle two epochs.
SIZES = [10, 7, 12, 9, 11, 8]


@pytest.fixture
def shards(tmp_path):
    from test_data import _jpeg, _write_tar

    img, first = _jpeg(8), 0
    for s, n in enumerate(SIZES):
        _write_tar(tmp_path / f"ids-{s:03d}.tar",
                   [(f"s{first + k:05d}", {"jpg": img, "cls": str(first + k).encode()}) for k in range(n)])
        first += n
    return str(tmp_path / ("ids-{000..%03d}.tar" % (len(SIZES) - 1)))


def _cfg(pattern, workers=0):
    from test_data import _wds_cfg

    return _wds_cfg(pattern, **{"data.batch_size": 3, "data.shuffle_buffer": 5, "data.num_workers": workers,
                                "data.epoch_size": sum(SIZES), "data.num_classes": 0})


@pytest.fixture
def record(monkeypatch):
    """(rank, epoch, sample id) of every sample the readers deliver, in order (readers of this
    process: data.num_workers=0, whose samples are exactly those of the batches handed out)."""
    seen: list[tuple[int, int, int]] = []
    real = sources_mod.WdsTrainSource._positions

    def positions(self, slot, role, counter):
        for epoch, i, raw in real(self, slot, role, counter):
            seen.append((self.rank, epoch, raw.label))
            yield epoch, i, raw

    monkeypatch.setattr(sources_mod.WdsTrainSource, "_positions", positions)
    return seen


def _leg(cfg, world, saved=None, batches=None, until_epoch=None, seen=None):
    """Every rank of a `world`-rank run, resumed from `saved` (the ranks' data states as the
    checkpoint keeps them), hands out `batches` batches, or until each rank has delivered a
    sample of epoch `until_epoch`; -> the ranks' data states."""
    streams = [build_train_stream(cfg, rank=r, world_size=world) for r in range(world)]
    if saved is not None:
        plan = ResumePlan(old=(3, 1, len(saved)), new=(3, 1, world), step=0)
        for r, s in enumerate(streams):
            s.load_state_dict(plan.data_state({"data": saved[0], "data_ranks": saved}, r))
    its = [iter(s) for s in streams]
    for k in range(200):
        if batches is not None and k == batches:
            break
        if until_epoch is not None and all(any(rk == r and e >= until_epoch for rk, e, _ in seen)
                                           for r in range(world)):
            break
        for it in its:
            next(it)
    else:
        raise AssertionError("the legs never reached the epoch")
    return [s.state_dict() for s in streams]


def _per_epoch(seen, epoch):
    return Counter(i for _, e, i in seen if e == epoch)


def _rank_sequence(seen, rank, epoch):
    return [i for r, e, i in seen if r == rank and e == epoch]


def test_replayed_buffer_names_what_the_reader_consumed():
    """The replay of the shuffle buffer over sample names agrees with the buffer itself."""
    rng = random.Random(0)
    sizes = {0: 5, 1: 9, 2: 4, 3: 7}
    for trial in range(200):
        pieces = [(u, None) if rng.random() < 0.5 else (u, sorted(rng.sample(range(sizes[u]), 3)))
                  for u in rng.sample(range(4), rng.randint(1, 4))]
        ids = [(u, k) for u, ks in pieces for k in (range(sizes[u]) if ks is None else ks)]
        buf, n = rng.choice([0, 1, 3, 6, 40]), rng.randint(0, len(ids) + 2)
        out = list(shuffled(iter(ids), buf, random.Random(trial)))[:n]
        whole, loose = _slot_left(pieces, n, buf, random.Random(trial), sizes.__getitem__)
        left = loose + [(u, k) for u in whole for k in range(sizes[u])]
        assert Counter(out + left) == Counter(ids), (pieces, buf, n)


def test_two_ranks_to_one_and_back_reads_each_sample_of_the_epoch_once(shards, record):
    cfg = _cfg(shards)
    n = sum(SIZES)
    # The uninterrupted 2-rank run, through epoch 1.
    _leg(cfg, 2, until_epoch=2, seen=record)
    ref = {r: _rank_sequence(record, r, 1) for r in (0, 1)}
    assert _per_epoch(record, 0) == _per_epoch(record, 1) == Counter(range(n))
    record.clear()
    # 2 ranks read 3 batches each, 1 rank 2 more, 2 ranks to the end of epoch 1.
    s2 = _leg(cfg, 2, batches=3)
    assert all(sd["positions"][0][0] == 0 for sd in s2)
    s1 = _leg(cfg, 1, saved=s2, batches=2)
    assert s1[0]["origin"]["world_size"] == 2
    _leg(cfg, 2, saved=s1, until_epoch=2, seen=record)
    assert _per_epoch(record, 0) == Counter(range(n))  # none twice, none skipped
    assert _per_epoch(record, 1) == Counter(range(n))
    # The next epoch is read as the uninterrupted 2-rank run reads it, rank by rank.
    assert {r: _rank_sequence(record, r, 1) for r in (0, 1)} == ref


def test_one_rank_with_workers_to_two_ranks(shards, record):
    cfg1, cfg2 = _cfg(shards, workers=2), _cfg(shards)
    n = sum(SIZES)
    _leg(cfg2, 2, until_epoch=2, seen=record)
    ref = {r: _rank_sequence(record, r, 1) for r in (0, 1)}
    record.clear()
    # 1 rank with 2 workers (2 readers): 4 batches, all inside epoch 0 (each reader has > 12).
    one = build_train_stream(cfg1, rank=0, world_size=1)
    it = iter(one)
    first = [int(v) for _ in range(4) for v in next(it)[1]]
    saved = [one.state_dict()]
    one.close()
    assert len(saved[0]["positions"]) == 2 and {e for e, _ in saved[0]["positions"]} == {0}
    _leg(cfg2, 2, saved=saved, until_epoch=2, seen=record)
    assert Counter(first) + _per_epoch(record, 0) == Counter(range(n))
    assert {r: _rank_sequence(record, r, 1) for r in (0, 1)} == ref


def test_a_same_shape_resume_of_a_moved_run_continues_it_exactly(shards, record):
    cfg = _cfg(shards)
    s1 = _leg(cfg, 1, batches=4)
    s2 = _leg(cfg, 2, saved=s1, batches=2)  # moved, still inside epoch 0
    assert s2[0]["origin"] is not None
    record.clear()
    _leg(cfg, 2, saved=s2, batches=12, seen=record)
    straight = list(record)
    record.clear()
    s2b = _leg(cfg, 2, saved=s2, batches=5)
    _leg(cfg, 2, saved=s2b, batches=7)
    assert record == straight
    # Once every reader is past the rest epochs, the saved position forgets the old shape.
    record.clear()
    s_late = _leg(cfg, 2, saved=s2, until_epoch=2, seen=record)
    again = _leg(cfg, 2, saved=s_late, batches=1)
    assert again[0]["origin"] is None


def test_an_old_checkpoint_without_every_rank_restarts_the_epoch_with_a_warning(shards):
    cfg = _cfg(shards)
    s2 = _leg(cfg, 2, batches=2)
    one = build_train_stream(cfg, rank=0, world_size=1)
    with pytest.warns(UserWarning, match="lacks every rank's position.*beginning of epoch 0"):
        one.load_state_dict({**s2[0], "world_size": 2})


@pytest.mark.slow
def test_training_moved_two_ranks_to_one_and_back_trains_on_each_sample_of_the_epoch_once(shards, tmp_path):
    """The trainer as users run it: torchrun ddp on 2 ranks (micro 2 x accumulation 2), stopped by
    SIGTERM after step 2; one process (micro 4 x 2) stopped after 2 more steps; 2 ranks to step 12."""
    import subprocess
    import sys

    from conftest import free_port
    from test_ddp import ROOT, TINY, _env, _ok

    from ldae_fast.engine import checkpoint as ck

    rec = tmp_path / "rec"
    rec.mkdir()
    out = tmp_path / "run"
    data = {"data.source": "wds", "data.train_shards": shards, "data.val_shards": shards, "data.num_workers": "0",
            "data.epoch_size": str(sum(SIZES)), "data.shuffle_buffer": "5", "data.img_size": "16",
            "engine.steps": "12", "engine.ckpt_every": "0", "engine.resume": "auto"}

    def launch(ranks, micro, stop_after=None):
        args = [f"--{k}={v}" for k, v in {**TINY, **data, "data.batch_size": micro,
                                          "engine.backend": "ddp" if ranks > 1 else "single",
                                          "engine.out_dir": str(out)}.items()]
        entry = str(ROOT / "tests" / "wds_record_entry.py")
        head = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                 "--master_port", str(free_port())] if ranks > 1 else [sys.executable])
        env = _env(LDAE_TEST_RECORD=str(rec), **({"LDAE_TEST_STOP_AFTER": str(stop_after)} if stop_after else {}))
        # Generous: guards a hang only (two ranks share two loaded cores).
        return subprocess.run(head + [entry, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    first = launch(2, 2, stop_after=2)
    assert first.returncode != 0 and "stopped at step 2 of 12" in first.stdout + first.stderr, first.stderr[-3000:]
    second = launch(1, 4, stop_after=2)
    assert second.returncode == 10, second.stderr[-3000:]
    assert "resuming on another shape" in second.stdout and "stopped at step 4 of 12" in second.stdout
    _ok(launch(2, 2))
    final = ck.load_state(ck.latest_checkpoint(out))
    assert final["step"] == 12 and final["world_size"] == 2
    seen = [tuple(map(int, line.split())) for f in sorted(rec.iterdir()) for line in f.read_text().splitlines()]
    # 12 steps x 8 images, the interrupted epoch 0 read whole and once, then epoch 1.
    assert len(seen) == 96
    assert Counter(i for e, i in seen if e == 0) == Counter(range(sum(SIZES)))
    assert max(Counter(i for e, i in seen if e == 1).values()) == 1
