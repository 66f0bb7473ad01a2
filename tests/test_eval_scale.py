"""Feature store, multi-lr fast heads, rank-sharded kNN and row maps (issue 22), and
`torchrun --nproc_per_node 2 ldae-fast eval` against one process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import free_port, one_step_checkpoint
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


def _as_two_ranks(rows: SplitRows) -> SplitRows:
    """The same rows as two ranks write them: two parts, each interleaving its readers' rows."""
    a, b = np.arange(0, len(rows), 2), np.arange(1, len(rows), 2)
    a, b = a[np.argsort(a % 3, kind="stable")], b[np.argsort(-(b % 5), kind="stable")]
    idx = np.concatenate([a, b])
    return SplitRows([rows.feats[0][a], rows.feats[0][b]], rows.labels[idx], rows.ids[idx], rows.dtype, rows.dim)


def test_heads_do_not_depend_on_the_stores_row_order():
    """Batches, the held-out and the val pass read rows by id: a store written by 2 ranks (other
    parts, other row order) trains bit-identical heads to one written by 1 rank."""
    x, y = _blobs(240, seed=7, spread=4.0)
    xv, yv = _blobs(61, seed=8, spread=4.0)
    tr, va = _rows(x, y), _rows(xv, yv, first_id=1000)
    kw = dict(num_classes=3, epochs=2, batch_size=16, seed=0, blrs=(0.1, 1.0, 10.0), holdout=0.25)
    one = train_heads(tr, va, **kw)
    two = train_heads(_as_two_ranks(tr), _as_two_ranks(va), **kw)
    one.pop("seconds"), two.pop("seconds")
    assert one == two


def _heads_rank(rank, world, rdv, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    x, y = _blobs(200, seed=9, spread=3.0)
    xv, yv = _blobs(40, seed=10, spread=3.0)
    res = train_heads(_rows(x, y), _rows(xv, yv), num_classes=3, epochs=2, batch_size=16, seed=1,
                      blrs=(0.03, 0.3, 3.0), holdout=0.2, share=True)
    torch.save(res, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_heads_shared_over_ranks_equal_one_rank_training_all(tmp_path):
    """share=True: rank r trains lrs r, r + N, ... (no rank idles in a collective while rank 0
    trains every head); every rank gets the answer one rank training them all gives."""
    out = tmp_path / "heads"
    torch.multiprocessing.spawn(_heads_rank, args=(2, str(tmp_path / "rdv"), str(out)), nprocs=2)
    x, y = _blobs(200, seed=9, spread=3.0)
    xv, yv = _blobs(40, seed=10, spread=3.0)
    one = train_heads(_rows(x, y), _rows(xv, yv), num_classes=3, epochs=2, batch_size=16, seed=1,
                      blrs=(0.03, 0.3, 3.0), holdout=0.2)
    one.pop("seconds")
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        got.pop("seconds")
        assert got == one, rank
    assert len(set(one["heldout_top1"].values())) > 1  # the lrs trained different heads


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


def test_process_group_gets_the_long_configurable_timeout(monkeypatch):
    """NCCL's 10-minute default watchdog would stop a run whose ranks wait out another's long
    share; the eval CLI joins with --dist-timeout (default 120 minutes)."""
    import datetime

    from ldae_fast.eval import dist as edist
    from ldae_fast.eval.driver import DEFAULT_TIMEOUT_MIN, build_parser

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(edist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(edist.dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(edist.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(edist.dist, "get_world_size", lambda: 2)
    args = build_parser().parse_args(["--checkpoint", "x"])
    assert args.dist_timeout == DEFAULT_TIMEOUT_MIN >= 60
    assert edist.init_from_env(torch.device("cpu"), timeout_min=args.dist_timeout) == edist.Ranks(1, 2)
    assert seen == dict(backend="gloo", timeout=datetime.timedelta(minutes=DEFAULT_TIMEOUT_MIN))
    args = build_parser().parse_args(["--checkpoint", "x", "--dist-timeout", "600"])
    edist.init_from_env(torch.device("cpu"), timeout_min=args.dist_timeout)
    assert seen["timeout"] == datetime.timedelta(hours=10)


# torchrun ----------------------------------------------------------------------------------
def test_torchrun_two_ranks_equal_one_rank(tmp_path):
    ckpt = one_step_checkpoint(tmp_path / "run")
    data = tmp_path / "data"
    write_split(data, "train", 4, 16, size=20, classes=4)
    # 16 val images: every rank's encoder forwards are full micro-batches of 4, on 1 rank and on 2
    # (the same shapes, so each image's features are the same bits whichever rank computes them).
    write_split(data, "val", 2, 8, size=20, classes=4, seed=1)
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
    # Two "nodes" of one rank each, as a multi-node job launches (c10d rendezvous; every rank is
    # local rank 0 of its node): the same 2-rank world as above.
    port = free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ldae-eval-test",
            "-m", "ldae_fast.cli", "eval", *args, "--out", str(tmp_path / "eval-nodes")]
    nodes = [subprocess.Popen(node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in nodes]  # generous: guards a hang only
    assert [p.returncode for p in nodes] == [0, 0], "\n---\n".join(o[-3000:] for o in outs)
    runs["nodes"] = json.loads((tmp_path / "eval-nodes" / "eval.json").read_text())
    assert runs[2]["ranks"] == runs["nodes"]["ranks"] == 2
    assert runs[1]["train_images"] == runs[2]["train_images"] == runs["nodes"]["train_images"] == 64
    nodes_rows = {(r["protocol"], r["encoder"]): r["top1"] for r in runs["nodes"]["rows"]}
    assert nodes_rows == {(r["protocol"], r["encoder"]): r["top1"] for r in runs[2]["rows"]}
    one = {(r["protocol"], r["encoder"]): r for r in runs[1]["rows"]}
    two = {(r["protocol"], r["encoder"]): r for r in runs[2]["rows"]}
    assert one.keys() == two.keys()
    encoders = {e for _, e in one}
    assert {"checkpoint", "random init", "pixels", "pixels (PCA 32)"} <= encoders
    assert ("knn k=5, whitened rows", "pixels") in one and ("linear", "checkpoint") in one
    assert ("finetune (EMA 0.9999)", "random init") in one
    assert one[("finetune", "checkpoint")]["accumulation"] == 4 and two[("finetune", "checkpoint")]["accumulation"] == 2
    for key, r in one.items():
        if key[0].startswith("linear-fast"):
            # The heads read the store's rows in id order: whichever ranks wrote it, the same heads.
            assert (r["top1"], r["top5"], r["blr"], r["heldout_top1"]) == (
                two[key]["top1"], two[key]["top5"], two[key]["blr"], two[key]["heldout_top1"]), key
        else:
            # Sums over ranks in another order: the accuracies of 16 val images may move by one image.
            assert abs(r["top1"] - two[key]["top1"]) <= 6.25 + 1e-9, key


def test_driver_reuses_the_store_and_a_changed_setting_writes_another(tmp_path, capsys):
    from ldae_fast.eval import driver

    ckpt = one_step_checkpoint(tmp_path / "run")
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


def _streaming_eval(tmp_path, device, **over):
    """A StreamingEval over tiny shards (nothing read until a protocol runs)."""
    from ldae_fast.config import build_config
    from ldae_fast.eval.scale import PixelView, ScaleArgs, StreamingEval

    data = tmp_path / "data"
    if not data.exists():
        write_split(data, "train", 2, 6, size=20, classes=3)
        write_split(data, "val", 1, 4, size=20, classes=3, seed=1)
    cfg = build_config("demo", {"data.source": "wds", "data.train_shards": str(data / "train-{000000..000001}.tar"),
                                "data.val_shards": str(data / "val-000000.tar"), "data.img_size": "16",
                                "data.epoch_size": "1", **over})
    view = PixelView(16)
    se = StreamingEval(cfg, {"pixels": view}, {}, ScaleArgs(readers=2, store_root=tmp_path / "store"),
                       pool="avg", seed=0, device=torch.device(device), max_train=None, max_val=None, log=None)
    return se, view


def test_store_key_follows_device_and_autocast(tmp_path):
    """A bf16 GPU store is not what an fp32 CPU run reads: the key names how features were computed."""
    cpu, view = _streaming_eval(tmp_path, "cpu")
    gpu, _ = _streaming_eval(tmp_path, "cuda")  # a device object only: nothing runs on it
    s_cpu, s_gpu = cpu._store_settings(view, {}), gpu._store_settings(view, {})
    assert s_cpu["compute"] == {"device": "cpu", "autocast": "fp32"}
    assert s_gpu["compute"] == {"device": "cuda", "autocast": "bfloat16"}
    assert FeatureStore(tmp_path, s_cpu).key != FeatureStore(tmp_path, s_gpu).key


def test_class_count_from_classes_tsv_and_sample_count_from_headers(tmp_path, monkeypatch):
    """make-shards' classes.tsv gives the class count with no scan; the sample count is a walk
    over tar headers and .cls members that never reads an image through the shard reader."""
    import gzip
    import shutil

    from ldae_fast.eval import split_info, stream
    from ldae_fast.eval.stream import scan_split

    se, _ = _streaming_eval(tmp_path, "cpu")
    want = scan_split(se.train_flat)  # the full reader: (12 samples, 3 classes)
    assert want == (12, 3)
    (tmp_path / "data" / "classes.tsv").write_text("".join(f"{i}\tn{i:08d}\n" for i in range(5)))

    def no_reader(spec):
        raise AssertionError("a plain local tar was read through the shard reader")
    monkeypatch.setattr(stream, "_shard_reader", no_reader)
    monkeypatch.setattr(split_info, "scan_labels", lambda spec: (_ for _ in ()).throw(AssertionError("scanned")))
    assert se.num_classes() == 5  # classes.tsv, though the shards only use 3 labels
    monkeypatch.undo()
    monkeypatch.setattr(stream, "_shard_reader", no_reader)
    assert split_info.scan_labels(se.train_flat) == want and se.num_train() == 12
    # A gzipped shard cannot be walked by seeking: it goes through the reader.
    src = Path(se.train_flat.urls[0])
    with open(src, "rb") as f, gzip.open(tmp_path / "one.tar.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    gz = dataclasses.replace(se.train_flat, urls=(str(tmp_path / "one.tar.gz"),))
    with pytest.raises(AssertionError, match="shard reader"):
        split_info.scan_labels(gz)


def test_data_dir_epoch_comes_from_the_eval_data_not_the_checkpoint(tmp_path):
    """--data DIR: the checkpoint's data.epoch_size (its pretraining set) is not the eval epoch."""
    from ldae_fast.eval.driver import with_data

    se, _ = _streaming_eval(tmp_path, "cpu", **{"data.epoch_size": "1281167"})
    new, _ = with_data(se.cfg, str(tmp_path / "data"))
    assert new.data.epoch_size == 1
    se2, _ = _streaming_eval(tmp_path, "cpu", **{"data.epoch_size": str(new.data.epoch_size)})
    assert se2.num_train() == 12
    capped, _ = with_data(se.cfg, str(tmp_path / "data"), max_train=8)
    assert capped.data.epoch_size == 8


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


def test_store_key_does_not_follow_the_reader_count_of_a_clean_view(tmp_path):
    """The default reader count follows the rank count; a rerun on another node count reads the
    same images and gets the same clean rows, so it reuses the store. A noisy view's noise follows
    the batches the readers make: there the count is in the key."""
    se, view = _streaming_eval(tmp_path, "cpu")
    clean, noisy = {"t": 10, "input": "clean"}, {"t": 10, "input": "noisy"}
    keys = {}
    for readers in (2, 4):
        se.sa.readers = readers
        keys[readers] = [FeatureStore(tmp_path, se._store_settings(view, p)).key for p in (clean, noisy)]
    assert keys[2][0] == keys[4][0]
    assert keys[2][1] != keys[4][1]
