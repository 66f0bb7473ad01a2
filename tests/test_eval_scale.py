"""Feature store, multi-lr fast heads, rank-sharded kNN and row maps (issue 22), and
`torchrun --nproc_per_node 2 ldae-fast eval` against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from eval_shards import write_split

from ldae_fast.eval.fast_heads import holdout_split, train_heads
from ldae_fast.eval.feature_store import FeatureStore, SplitRows, weights_hash
from ldae_fast.eval.knn import knn_classify
from ldae_fast.eval.knn_sharded import knn_sharded
from ldae_fast.eval.rows import fit_rows


def _rows(x: torch.Tensor, y: torch.Tensor, first_id: int = 0) -> SplitRows:
    ids = np.stack([np.zeros(len(y), np.int64), np.arange(first_id, first_id + len(y))], 1)
    return SplitRows([x.to(torch.float16).numpy()], y.numpy(), ids, "fp16", x.shape[1])


def _blobs(n, dim=8, classes=3, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(n) % classes
    x = centres[y] + spread * torch.randn(n, dim, generator=g)
    return x, y


# Feature store --------------------------------------------------------------------------------
def _chunks(x, y, calls):
    def gen():
        calls.append(1)
        for a in range(0, len(y), 7):
            ids = torch.stack([torch.zeros(len(y[a:a + 7]), dtype=torch.int64), torch.arange(a, a + len(y[a:a + 7]))], 1)
            yield x[a:a + 7], y[a:a + 7], ids
    return gen


def test_feature_store_roundtrip_reuse_and_invalidation(tmp_path):
    x, y = _blobs(30)
    enc = torch.nn.Linear(3, 4)
    settings = dict(encoder=weights_hash(enc), probe=dict(sigma=0.01), pool="avg", img_size=32)
    calls: list = []
    st = FeatureStore(tmp_path, settings, "bf16")
    assert not st.complete()
    st.write({"train": _chunks(x, y, calls), "val": _chunks(x[:9], y[:9], calls)})
    assert st.complete() and len(calls) == 2
    tr = st.read("train")
    assert len(tr) == 30 and tr.dim == 8 and np.array_equal(tr.labels, y.numpy())
    torch.testing.assert_close(tr.all(), x.to(torch.bfloat16).float(), rtol=0, atol=0)
    assert (st.dir / "train-part00000.feat").stat().st_size == 30 * 8 * 2  # 16-bit rows on disk
    # Same settings: the same directory, complete, nothing to write.
    again = FeatureStore(tmp_path, dict(settings), "bf16")
    assert again.dir == st.dir and again.complete()
    # Anything that changes a feature changes the key: weights, probe view, dtype.
    with torch.no_grad():
        enc.weight[0, 0] += 1e-3
    for other in (dict(settings, encoder=weights_hash(enc)), dict(settings, probe=dict(sigma=0.02))):
        assert FeatureStore(tmp_path, other, "bf16").dir != st.dir
    assert FeatureStore(tmp_path, settings, "fp16").dir != st.dir
    # A pass killed before its manifest is not a store.
    st.manifest_path.unlink()
    assert not FeatureStore(tmp_path, settings, "bf16").complete()


# Fast heads ------------------------------------------------------------------------------------
def test_heads_per_lr_equal_single_runs_and_lr_is_picked_on_train_only():
    x, y = _blobs(240, seed=1, spread=2.0)
    xv, yv = _blobs(60, seed=2, spread=2.0)
    tr, va = _rows(x, y), _rows(xv, yv)
    kw = dict(num_classes=3, epochs=3, batch_size=32, seed=0)
    many = train_heads(tr, va, blrs=(0.001, 0.5), holdout=0.2, **kw)
    assert many["blr"] == 0.5 and many["heldout_images"] == 48 and many["train_images"] == 192
    assert many["heldout_top1"][0.5] > many["heldout_top1"][0.001]
    # The pick never reads val: scrambled val labels change the number, not the choice.
    bad = train_heads(tr, _rows(xv, (yv + 1) % 3), blrs=(0.001, 0.5), holdout=0.2, **kw)
    assert bad["blr"] == many["blr"] and bad["heldout_top1"] == many["heldout_top1"]
    assert bad["top1"] < many["top1"]
    # One head among several trains exactly as it would alone (shared BN, independent grads).
    alone = train_heads(tr, va, blrs=(0.5,), holdout=0.2, **kw)
    assert alone["top1"] == many["top1"] and alone["heldout_top1"][0.5] == many["heldout_top1"][0.5]


def test_holdout_split_follows_ids_not_row_order():
    x, y = _blobs(50)
    a = _rows(x, y)
    perm = np.random.default_rng(0).permutation(50)
    b = SplitRows([a.feats[0][perm]], a.labels[perm], a.ids[perm], "fp16", 8)
    held_a = {tuple(a.ids[i]) for i in holdout_split(a, 0.2, 3)[1]}
    held_b = {tuple(b.ids[i]) for i in holdout_split(b, 0.2, 3)[1]}
    assert held_a == held_b and len(held_a) == 10


# Rows and kNN ---------------------------------------------------------------------------------
def test_whitened_rows_have_identity_covariance_and_raw_knn_matches_knn_py():
    x, y = _blobs(200, dim=6, seed=3)
    x = x * torch.tensor([10.0, 1, 1, 1, 1, 0.1])  # anisotropic, as pooled ViT features are
    tr = _rows(x, y)
    w = fit_rows(tr, "whitened", eps=0.0)(tr.all()).double()
    cov = torch.cov(w.t(), correction=0)
    torch.testing.assert_close(cov, torch.eye(6, dtype=torch.float64), atol=1e-4, rtol=0)
    # The default eps (1e-6 of the largest variance) only shrinks the smallest directions.
    d = torch.cov(fit_rows(tr, "whitened")(tr.all()).double().t(), correction=0).diagonal()
    assert d[:5].min() > 0.99 and 0.9 < d[5] < 1.0
    assert torch.cov(tr.all().t().double()).diagonal().max() > 1000 * torch.cov(tr.all().t().double()).diagonal().min()
    xv, yv = _blobs(40, dim=6, seed=4)
    va = _rows(xv, yv)
    ours = knn_sharded(tr, va, fit_rows(tr, "raw"), num_classes=3, ks=(5, 20), bank_chunk=37, query_chunk=16)
    ref = knn_classify(tr.all(), torch.from_numpy(tr.labels), va.all(), torch.from_numpy(va.labels), ks=(5, 20))
    for k in (5, 20):
        assert ours[k]["top1"] == ref[k]["top1"] and ours[k]["top5"] == ref[k]["top5"]


def _knn_rank(rank, world, rdv, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    x, y = _blobs(90, dim=5, seed=5, spread=3.0)
    xv, yv = _blobs(30, dim=5, seed=6, spread=3.0)
    part = slice(rank * 45, (rank + 1) * 45) if world == 2 else slice(None)
    bank = _rows(x[part], y[part], first_id=rank * 45)
    res = {kind: knn_sharded(bank, _rows(xv, yv), fit_rows(bank, kind), num_classes=3, ks=(3, 10), bank_chunk=16)
           for kind in ("raw", "centred", "whitened")}
    if rank == 0:
        torch.save(res, out)
    dist.barrier()  # no rank tears gloo down while a peer is still in the group
    dist.destroy_process_group()
    os._exit(0)  # and none is aborted by the interpreter's teardown of the freed group


@pytest.mark.parametrize("world", [1, 2])
def test_knn_bank_sharded_over_ranks_equals_one_rank(tmp_path, world):
    out = tmp_path / f"knn{world}.pt"
    torch.multiprocessing.spawn(_knn_rank, args=(world, str(tmp_path / "rdv"), str(out)), nprocs=world)
    got = torch.load(out, weights_only=True)
    bank = _rows(*_blobs(90, dim=5, seed=5, spread=3.0))
    xv, yv = _blobs(30, dim=5, seed=6, spread=3.0)
    for kind, res in got.items():
        one = knn_sharded(bank, _rows(xv, yv), fit_rows(bank, kind), num_classes=3, ks=(3, 10))
        assert res == one, kind


# torchrun ----------------------------------------------------------------------------------
def test_torchrun_two_ranks_equal_one_rank(tmp_path):
    from ldae_fast.config import build_config
    from ldae_fast.engine import loop

    over = {"model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1",
            "model.decoder_depth": "1", "data.img_size": "16", "model.patch_size": "4",
            "data.batch_size": "8", "data.synthetic_images": "32", "tokenizer.fit_images": "16",
            "engine.kernels": "reference", "engine.steps": "1", "engine.progress": "false",
            "eval.probe": "false", "eval.figure": "false", "engine.out_dir": str(tmp_path / "run")}
    ckpt = loop.train(build_config("demo", over)).checkpoint
    data = tmp_path / "data"
    write_split(data, "train", 4, 16, size=20, classes=4)
    write_split(data, "val", 2, 10, size=20, classes=4, seed=1)
    args = ["--checkpoint", str(ckpt), "--data", str(data), "--protocols", "linear-fast,knn,linear,finetune",
            "--epochs", "2", "--batch-size", "16", "--readers", "4", "--micro-batch", "4", "--knn-k", "5",
            "--num-workers", "0", "--blrs", "0.1,1", "--device", "cpu", "--finetune-steps", "2",
            "--finetune-batch-size", "16"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"eval{n}"
        subprocess.run([*torchrun, f"--nproc_per_node={n}", "-m", "ldae_fast.cli", "eval", *args,
                        "--out", str(out)], check=True, env=env, capture_output=True, text=True, timeout=600)
        runs[n] = json.loads((out / "eval.json").read_text())
    assert runs[2]["ranks"] == 2 and runs[1]["train_images"] == runs[2]["train_images"] == 64
    one = {(r["protocol"], r["encoder"]): r for r in runs[1]["rows"]}
    two = {(r["protocol"], r["encoder"]): r for r in runs[2]["rows"]}
    assert one.keys() == two.keys()
    encoders = {e for _, e in one}
    assert {"checkpoint", "random init", "pixels", "pixels (PCA 32)"} <= encoders
    assert ("knn k=5, whitened rows", "pixels") in one and ("linear", "checkpoint") in one
    assert ("finetune (EMA 0.9999)", "random init") in one
    assert one[("finetune", "checkpoint")]["accumulation"] == 4 and two[("finetune", "checkpoint")]["accumulation"] == 2
    for key, r in one.items():
        # Sums over ranks in another order: the accuracies of 20 val images may move by one image.
        assert abs(r["top1"] - two[key]["top1"]) <= 5.0 + 1e-9, key


def test_driver_reuses_the_store_and_a_changed_setting_writes_another(tmp_path, capsys):
    from ldae_fast.config import build_config
    from ldae_fast.engine import loop
    from ldae_fast.eval import driver

    over = {"model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1",
            "model.decoder_depth": "1", "data.img_size": "16", "model.patch_size": "4",
            "data.batch_size": "8", "data.synthetic_images": "32", "tokenizer.fit_images": "16",
            "engine.kernels": "reference", "engine.steps": "1", "engine.progress": "false",
            "eval.probe": "false", "eval.figure": "false", "engine.out_dir": str(tmp_path / "run")}
    ckpt = loop.train(build_config("demo", over)).checkpoint
    data = tmp_path / "data"
    write_split(data, "train", 2, 12, size=20, classes=3)
    write_split(data, "val", 1, 9, size=20, classes=3, seed=1)
    store = tmp_path / "store"
    args = ["--checkpoint", str(ckpt), "--data", str(data), "--protocols", "linear-fast", "--epochs", "1",
            "--batch-size", "8", "--readers", "2", "--num-workers", "0", "--no-baseline", "--no-pixels",
            "--feature-store", str(store), "--out", str(tmp_path / "out")]
    assert driver.main(args) == 0
    first = capsys.readouterr().out
    (key,) = [p.name for p in store.iterdir()]
    feat = store / key / "train-part00000.feat"
    stamp = feat.stat().st_mtime_ns
    assert "writing the feature store" in first
    assert driver.main(args) == 0
    assert "reusing the feature store" in capsys.readouterr().out and feat.stat().st_mtime_ns == stamp
    assert driver.main(args + ["--probe-t", "40"]) == 0  # another probe view: another store
    assert len(list(store.iterdir())) == 2 and "writing the feature store" in capsys.readouterr().out


def test_fit_tensor_is_fit_rows_on_one_process_and_uses_the_train_rows_alone():
    """fit_tensor (the in-memory path learn_check and the demo epilogue use) gives fit_rows' map;
    the map is a function of the train rows: any val rows are only mapped by it."""
    from ldae_fast.eval.rows import fit_tensor

    x, y = _blobs(120, dim=6, seed=7)
    x = x * torch.tensor([10.0, 1, 1, 1, 1, 0.1])
    x = x.half().float()  # _rows stores fp16: the same numbers on both paths
    ref = fit_rows(_rows(x, y), "whitened")
    ours = fit_tensor(x, "whitened")
    torch.testing.assert_close(ours.mean, ref.mean)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
    # Fewer rows than dimensions (raw pixels): the SVD path, the same identity covariance on train.
    wide = torch.randn(10, 30, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 10, 30)
    w = fit_tensor(wide, "whitened", eps=0.0)(wide).double()
    torch.testing.assert_close((w.t() @ w / 10)[:9, :9], torch.eye(9, dtype=torch.float64), atol=1e-4, rtol=0)
