"""The streaming eval data path (eval/stream.py): rank / worker splits, keyed augmentation,
exact resume, bad samples, and memory bounded by the chunk rather than the split."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from eval_shards import write_split

from ldae_fast.data.urls import expand_urls
from ldae_fast.errors import UsageError
from ldae_fast.eval.stream import EvalStream, SplitSpec, count_samples


def _spec(pattern, what="val", augment=False, readers=4, **kw) -> SplitSpec:
    return SplitSpec(tuple(expand_urls(pattern, what)), what, 16, augment, readers=readers, **kw)


def _pass(spec, rank, world, workers=0):
    out = {}
    for x, y, ids in EvalStream(spec, rank, world, workers).once(chunk=5):
        for img, lab, i in zip(x, y, ids.tolist()):
            assert tuple(i) not in out
            out[tuple(i)] = (img, int(lab))
    return out


@pytest.mark.parametrize("shards,max_images", [(4, None), (2, None), (4, 30)])
def test_once_splits_every_sample_exactly_once_over_ranks_and_workers(tmp_path, shards, max_images):
    pat = write_split(tmp_path, "val", shards, 10)
    spec = _spec(pat, readers=4, max_images=max_images)
    assert spec.shard_level == (shards >= 4 and max_images is None)
    one = _pass(spec, 0, 1)
    assert len(one) == (max_images or shards * 10) == count_samples(spec)
    r0, r1 = _pass(spec, 0, 2), _pass(spec, 1, 2, workers=2)
    assert not set(r0) & set(r1) and set(r0) | set(r1) == set(one)
    for k, (img, lab) in {**r0, **r1}.items():
        assert torch.equal(img, one[k][0]) and lab == one[k][1]
    if max_images:  # the cap keeps the first samples in shard and tar order
        assert sorted(one) == [(s, j) for s in range(shards) for j in range(10)][:max_images]


def _steps(spec, world, n, per_reader=3, positions=None, first=0, workers=0):
    """{step: {reader: images}} of n steps, all ranks."""
    out: dict[int, dict[int, torch.Tensor]] = {}
    last_pos = {}
    for rank in range(world):
        st = EvalStream(spec, rank, world, workers)
        for step, x, y, pos in st.steps(per_reader, first, positions):
            for k, r in enumerate(st.readers):
                out.setdefault(step, {})[r] = (x[k * per_reader:(k + 1) * per_reader], y[k * per_reader:(k + 1) * per_reader])
            last_pos.update(pos)
            if step + 1 - first >= n:
                break
    return out, last_pos


def test_augmented_global_batch_independent_of_ranks_workers_and_resume(tmp_path):
    pat = write_split(tmp_path, "train", 4, 7)
    spec = _spec(pat, "train", augment=True, readers=4, shuffle_buffer=5, seed=3)
    a, _ = _steps(spec, 1, 6)
    b, _ = _steps(spec, 2, 6, workers=2)
    for step in a:
        for r in range(4):
            assert torch.equal(a[step][r][0], b[step][r][0]) and torch.equal(a[step][r][1], b[step][r][1])
    # 6 steps x 3 per reader crosses the 7-sample epochs: epochs differ in order and crops.
    assert not torch.equal(a[0][0][0], a[3][0][0][:3])
    # Resume after step 3 from the saved positions: the same steps 4..5.
    _, pos = _steps(spec, 1, 4)
    c, _ = _steps(spec, 2, 2, positions=pos, first=4)
    for step in (4, 5):
        for r in range(4):
            assert torch.equal(a[step][r][0], c[step][r][0])


def test_bad_sample_counted_and_named(tmp_path, caplog):
    pat = write_split(tmp_path, "val", 2, 6, corrupt=(1, 2))
    st = EvalStream(_spec(pat, readers=2), 0, 1)
    with caplog.at_level(logging.WARNING, logger="ldae_fast.data"):
        n = sum(x.shape[0] for x, _, _ in st.once(chunk=4))
    assert n == 11 and st.stats() == {"good": 11, "bad": 1}
    assert "val-000001.tar" in caplog.text and "val0000008" in caplog.text


@pytest.mark.parametrize("augment", [False, True])
def test_fewer_shards_than_readers(tmp_path, monkeypatch, augment):
    """5 readers on 2 shards. A deterministic pass splits inside the shards: each reader opens one
    shard (not all of them) and the readers sharing it take turns over its samples. The endless
    augmented stream stays sample by sample (its steps need every reader to hold as many samples
    as the others, within one). Either way every sample comes once per epoch, and the bad samples
    the tar reader finds (labels past num_classes) are divided among the readers like the good
    ones, so the bad fraction each reader judges is its own, not several times the split's."""
    from ldae_fast.data.badsamples import BadSampleCounter
    from ldae_fast.eval import stream as es

    pat = write_split(tmp_path, "val", 2, 12, classes=4)  # labels 0..3; num_classes 3 makes 6 bad
    spec = _spec(pat, augment=augment, readers=5, num_classes=3, seed=7)
    assert not spec.shard_level
    opened = []
    real = es.iter_shard

    def spy(url, counter, labels):
        opened.append(url)
        return real(url, counter, labels)

    monkeypatch.setattr(es, "iter_shard", spy)
    for epoch in (0, 1):
        opened.clear()
        ids, bad, sizes = [], 0, []
        for r in range(5):
            c = BadSampleCounter(1.0)
            mine = [sid for sid, _ in es._epoch_samples(spec, r, epoch, c)]
            ids += mine
            sizes.append(len(mine))
            bad += c.bad
        # one shard per reader when split; sample by sample every reader reads both
        assert len(opened) == (10 if augment else 5), opened
        assert sorted(ids) == sorted((s, j) for s in range(2) for j in range(9))  # 9 good per shard
        assert bad == 6
        if augment:
            assert max(sizes) - min(sizes) <= 1, sizes
    if not augment:
        one = _pass(spec, 0, 1)
        r0, r1 = _pass(spec, 0, 5), {}
        for rank in range(1, 5):
            r1.update(_pass(spec, rank, 5))
        assert not set(r0) & set(r1) and set(r0) | set(r1) == set(one) and len(one) == 18


def test_short_last_shard_with_more_readers_than_shards(tmp_path):
    """A short last shard (12 + 2 images, 8 readers): the pass split inside the shards leaves some
    readers without a sample, and still gives every image once; the augmented stream, read
    sample by sample, gives every reader one or two per epoch and never runs dry."""
    write_split(tmp_path / "a", "train", 1, 12)
    write_split(tmp_path / "b", "train", 1, 2, seed=3)
    (tmp_path / "b" / "train-000000.tar").rename(tmp_path / "a" / "train-000001.tar")
    pat = str(tmp_path / "a" / "train-{000000..000001}.tar")
    one = _pass(_spec(pat, "train", readers=8), 0, 1)
    assert sorted(one) == [(0, j) for j in range(12)] + [(1, 0), (1, 1)]
    spec = _spec(pat, "train", augment=True, readers=8, shuffle_buffer=2, seed=1)
    steps, _ = _steps(spec, 2, 4, per_reader=1)
    assert sorted(steps) == [0, 1, 2, 3] and all(len(v) == 8 for v in steps.values())


_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {tests!r})
    from eval_shards import write_split
    from pathlib import Path
    from ldae_fast.data.urls import expand_urls
    from ldae_fast.eval.stream import EvalStream, SplitSpec
    torch.set_num_threads(1)
    root, mode = Path(sys.argv[1]), sys.argv[2]
    pat = str(root / ("val-{{000000..%06d}}.tar" % (len(list(root.glob("val-*.tar"))) - 1)))
    spec = SplitSpec(tuple(expand_urls(pat, "val")), "val", 64, False, readers=2)
    enc = torch.nn.Conv2d(3, 8, 16, stride=16)
    n = 0
    if mode == "stream":
        for x, y, ids in EvalStream(spec, 0, 1).once(chunk=32):
            with torch.no_grad():
                n += enc(x.float()).mean((2, 3)).shape[0]
    else:  # the whole split in RAM, as data/eval_arrays.py builds it: the positive control
        from ldae_fast.data.transforms import eval_transform
        from ldae_fast.data.tar import iter_shard
        from ldae_fast.data.badsamples import BadSampleCounter
        imgs = [eval_transform(r.data, 64).float() for u in spec.urls for r in iter_shard(u, BadSampleCounter(1.0))]
        n = torch.stack(imgs).shape[0]
    print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def _peak_rss_kib(root: Path, mode: str) -> tuple[int, int]:
    code = _RSS_SCRIPT.format(tests=str(Path(__file__).parent))
    # Through a small launcher: Linux carries a process's peak RSS across exec, and a child forked
    # straight from this (large) pytest process would start its peak at pytest's RSS.
    launcher = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", launcher, sys.executable, "-c", code, str(root), mode],
                         capture_output=True,
                         text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                         "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr[-2000:]
    n, rss = out.stdout.split()
    return int(n), int(rss)


def test_stream_peak_rss_does_not_grow_with_the_split(tmp_path):
    small, big = tmp_path / "n", tmp_path / "4n"
    write_split(small, "val", 2, 150, size=64)
    write_split(big, "val", 8, 150, size=64)
    n1, rss1 = _peak_rss_kib(small, "stream")
    n4, rss4 = _peak_rss_kib(big, "stream")
    assert (n1, n4) == (300, 1200)
    # 900 more images would be 900 x 12 x 64 x 64 bytes = 42 MiB held in RAM; the stream holds none.
    assert abs(rss4 - rss1) / rss1 < 0.03, (rss1, rss4)
    _, arr1 = _peak_rss_kib(small, "arrays")
    _, arr4 = _peak_rss_kib(big, "arrays")
    assert arr4 - arr1 > 30 * 1024, ("the in-RAM control grows with the split (the test can fail)", arr1, arr4)


def test_uneven_shares_and_default_readers(tmp_path):
    from ldae_fast.eval.stream import batch_shares, default_readers

    assert batch_shares(10, 4) == {0: 3, 1: 3, 2: 2, 3: 2} and sum(batch_shares(16384, 80).values()) == 16384
    assert [default_readers(n, w) for n, w in ((1, 0), (8, 10), (3, 2), (64, 10))] == [16, 80, 18, 640]

    pat = write_split(tmp_path, "train", 3, 8)
    spec = _spec(pat, "train", augment=True, readers=4, shuffle_buffer=3, seed=5, max_images=20)
    shares = batch_shares(10, 4)
    got = {}
    for world in (1, 2):
        rows = []
        for rank in range(world):
            st = EvalStream(spec, rank, world)
            for step, x, _y, _pos in st.steps(shares):
                assert x.shape[0] == sum(shares[r] for r in st.readers)
                rows.append((step, rank, x))
                if step == 2:
                    break
        got[world] = rows
    one = {s: x for s, _, x in got[1]}
    for s in range(3):  # rank 0 hosts readers 0, 2 (3 + 2 images), rank 1 readers 1, 3
        r0 = next(x for st, rk, x in got[2] if st == s and rk == 0)
        r1 = next(x for st, rk, x in got[2] if st == s and rk == 1)
        assert torch.equal(one[s], torch.cat([r0[:3], r1[:3], r0[3:], r1[3:]]))


def test_default_readers_valid_on_any_rank_count_and_balanced_over_shards():
    """ImageNet's 1024 train shards on 1 to 128 ranks of 10 workers: the default is a multiple of the
    rank count (--readers 80 is refused on 64 ranks) that divides the shards (80 readers would own
    13 or 12 shards, so some images come round ~8% more often), at least ranks x workers where
    the shards allow."""
    from ldae_fast.eval.finetune_run import finetune_readers
    from ldae_fast.eval.stream import SplitSpec, default_readers, readers_of_rank

    with pytest.raises(UsageError, match="not a multiple of the 64 ranks"):
        readers_of_rank(SplitSpec(("a",), "x", 8, False, readers=80), 0, 64)
    for world in (1, 2, 3, 4, 8, 16, 24, 32, 64, 128):
        r = default_readers(world, 10, 1024, at_most=16384)
        # every worker decodes, unless that takes more readers than shards (128 ranks x 10)
        assert r % world == 0 and r >= 16 and (r >= world * 10 or r == 1024), (world, r)
        if world != 3 and world != 24:  # 1024 = 2^10 has no divisor that is a multiple of 3
            assert 1024 % r == 0, (world, r)
        readers_of_rank(SplitSpec(("a",) * 1024, "x", 8, True, readers=r), world - 1, world)
    assert default_readers(8, 10, 1024) == 128 and default_readers(64, 10, 1024) == 1024
    assert default_readers(1, 0, 1024) == 16 and default_readers(8, 10, 1000) == 200
    assert default_readers(1, 0, 20, at_most=16) == 16  # the probe's batch 16 bounds the divisors
    # The fine-tune's default divides its batch (1024, MixUp pairs): valid on 64 ranks of 10 workers too.
    assert finetune_readers(1024, 1, 8, 8, None, even=True) == 64
    assert finetune_readers(1024, 1, 64, 10, None, even=True) == 512
