"""The probe sweep over depth k and noise step t (issue 22 item 4, l-DAE App. A): every k from one
forward, one feature store per (k, t) under the single probe's key, heads for every (k, t, lr) in
one pass, and a table with one row per (k, t)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from eval_shards import write_split

from ldae_fast.config import build_config
from ldae_fast.eval import dist as edist
from ldae_fast.eval.fast_heads import train_heads, train_heads_many
from ldae_fast.eval.feature_store import SplitRows
from ldae_fast.eval.features import pool_features
from ldae_fast.eval.sweep import plan, probe_key, single_view, sweep_table
from ldae_fast.methods import build_model

TINY = {"model.width": "32", "model.num_heads": "2", "model.encoder_depth": "2", "model.decoder_depth": "2",
        "data.img_size": "16", "model.patch_size": "4", "engine.kernels": "reference"}


def _scrambled(cfg):
    """The network with every tensor redrawn: at init adaLN-Zero makes each block the identity,
    and every depth would read the same features."""
    torch.manual_seed(0)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m.eval()


class _NoMethod:
    """Clean input needs no tokenizer: plan() only moves the method."""

    def to(self, device):
        return None


@pytest.mark.parametrize("layout", ["dit", "mae"])
def test_one_forward_gives_each_depth_the_features_of_a_forward_cut_there(layout):
    cfg = build_config("demo", {**TINY, "ldae.layout": layout})
    model = _scrambled(cfg)
    depths = [1, 2, 3, 4, 0] if layout == "dit" else [1, 2, 0]  # 'dit' reads on into the decoder
    x = torch.randn(5, 3, 16, 16)
    passes = plan(model, cfg, _NoMethod(), depths, [0, 10], "cpu")
    assert [p.t for p in passes] == [0, 10] and all(len(p.entries) == len(depths) for p in passes)
    seen = []
    with torch.no_grad():
        for p in passes:
            one_pass = p.view.pooled_depths(x, [en.k for en in p.entries], "avg")
            for en, f in zip(p.entries, one_pass):
                # A separate extraction at (k, t), through the single probe's own view and code path.
                alone = pool_features(single_view(model, _cfg_at(cfg, en.k, en.t), _NoMethod(), "cpu"), x, "avg")
                assert torch.equal(f, alone), (layout, en.k, en.t)
                seen.append(f)
    # Not trivially equal: the depths and the two t's read different features.
    assert len({tuple(f.flatten()[:4].tolist()) for f in seen}) == len(seen) - 2  # k=0 is k=2 at each t


def _cfg_at(cfg, k, t):
    from ldae_fast.eval.sweep import at

    return at(cfg, k=k, t=t)


def test_store_key_separates_k_and_t():
    cfg = build_config("demo", {**TINY, "ldae.layout": "dit"})
    keys = {(k, t): json.dumps(probe_key(_cfg_at(cfg, k, t)), sort_keys=True) for k in (1, 2, 3) for t in (0, 10, 20)}
    assert len(set(keys.values())) == 9
    assert all(f'"depth": {k}' in v and f'"t": {t}' in v for (k, t), v in keys.items())


@pytest.mark.parametrize("preset", ["diffmae-demo", "mae-demo"])
def test_store_key_of_an_encoder_without_a_noise_level_leaves_t_out(preset):
    """eval.probe_t changes nothing DiffMAE's or MAE's encoder reads: another --probe-t reuses the
    store. The depth still separates stores."""
    cfg = build_config(preset)
    keys = {(k, t): json.dumps(probe_key(_cfg_at(cfg, k, t)), sort_keys=True) for k in (1, 2) for t in (0, 10)}
    assert keys[(1, 0)] == keys[(1, 10)] and keys[(2, 0)] == keys[(2, 10)]
    assert keys[(1, 0)] != keys[(2, 0)]


def _rows(x, y):
    ids = np.stack([np.zeros(len(y), np.int64), np.arange(len(y))], 1)
    return SplitRows([x.to(torch.float16).numpy()], y.numpy(), ids, "fp16", x.shape[1])


def _entries(spreads=(0.5, 3.0)):
    """(k, t) entries of the same images, as stores give them: one easier than the next."""
    g = torch.Generator().manual_seed(3)
    y, yv = torch.arange(120) % 3, torch.arange(30) % 3
    entries = []
    for spread in spreads:
        c = torch.randn(3, 6, generator=g) * 2
        entries.append((_rows(c[y] + spread * torch.randn(120, 6, generator=g), y),
                        _rows(c[yv] + spread * torch.randn(30, 6, generator=g), yv)))
    return entries


HEADS = dict(num_classes=3, blrs=(0.01, 0.5), epochs=3, batch_size=16, holdout=0.2, seed=1)


def _without_time(results):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in results]


def test_heads_of_every_entry_in_one_pass_equal_each_entry_alone():
    entries, kw = _entries(), HEADS
    many = train_heads_many(entries, **kw)
    for (tr, va), got in zip(entries, many):
        alone = train_heads(tr, va, **kw)
        assert got["top1"] == alone["top1"] and got["blr"] == alone["blr"]
        assert got["heldout_top1"] == alone["heldout_top1"]
    assert many[0]["top1"] != many[1]["top1"]
    # Stores of other images (or another order) are refused, not paired row by row.
    tr, va = entries[1]
    shuffled = SplitRows([tr.feats[0][::-1].copy()], tr.labels[::-1].copy(), tr.ids[::-1].copy(), "fp16", 6)
    with pytest.raises(ValueError, match="same images"):
        train_heads_many([entries[0], (shuffled, va)], **kw)


def _spread_rank(rank, world, rdv, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    entries = _entries((0.5, 1.5, 3.0))
    got = edist.spread(list(range(3)), lambda mine: train_heads_many([entries[i] for i in mine], **HEADS))
    if rank == 0:
        Path(out).write_text(json.dumps(_without_time(got)))
    dist.barrier()  # no rank tears gloo down while a peer is still in the group
    dist.destroy_process_group()
    os._exit(0)  # and none is aborted by the interpreter's teardown of the freed group


def test_sweep_heads_shared_out_over_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "two.json"
    torch.multiprocessing.spawn(_spread_rank, args=(2, str(tmp_path / "rdv"), str(out)), nprocs=2)
    one = json.loads(json.dumps(_without_time(train_heads_many(_entries((0.5, 1.5, 3.0)), **HEADS))))
    assert json.loads(out.read_text()) == one


def test_table_has_one_row_per_k_and_t_with_the_floor_and_the_paper_beside():
    recs = [dict(k=k, t=t, sigma=t / 100, input="clean", encoder=enc, top1=50.0 + k, blr=0.1)
            for enc in ("checkpoint", "random init") for k in (9, 12) for t in (0, 10)]
    paper = dict(top1={(12, 10, "clean"): 64.5})
    lines = sweep_table(recs, paper).splitlines()
    assert len(lines) == 2 + 4
    assert "checkpoint top-1" in lines[0] and "random init top-1" in lines[0] and "paper" in lines[0]
    row = [ln for ln in lines if ln.startswith("| 12 | 10 |")]
    assert len(row) == 1 and row[0].rstrip(" |").endswith("64.5") and row[0].count("62.00 (0.1)") == 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-step 'dit' checkpoint (2 + 2 blocks) and tiny train / val shards."""
    from ldae_fast.engine import loop

    tmp = tmp_path_factory.mktemp("sweep")
    over = {**TINY, "ldae.layout": "dit", "data.batch_size": "8", "data.synthetic_images": "32",
            "tokenizer.fit_images": "16", "engine.steps": "1", "engine.progress": "false", "eval.probe": "false",
            "eval.figure": "false", "engine.out_dir": str(tmp / "run")}
    ckpt = loop.train(build_config("demo", over)).checkpoint
    data = tmp / "data"
    write_split(data, "train", 2, 12, size=20, classes=3)
    write_split(data, "val", 1, 9, size=20, classes=3, seed=1)
    return tmp, ckpt, data


def _store_probes(store):
    return {json.dumps(json.loads((d / "manifest.json").read_text())["settings"]["probe"], sort_keys=True)
            for d in store.iterdir()}


def test_driver_sweep_writes_one_store_per_k_and_t_reuses_them_and_tables_them(tiny_run, capsys):
    from ldae_fast.eval import driver

    tmp, ckpt, data = tiny_run
    store, out = tmp / "store", tmp / "out"
    base = ["--checkpoint", str(ckpt), "--data", str(data), "--protocols", "linear-fast", "--epochs", "1",
            "--batch-size", "8", "--readers", "2", "--num-workers", "0", "--no-pixels", "--no-baseline",
            "--feature-store", str(store), "--out", str(out)]
    sweep = ["--probe-depths", "1,3", "--probe-ts", "0,10"]
    assert driver.main(base + sweep) == 0
    log = capsys.readouterr().out
    assert "writing 4 from one pass over the images, 2 forward(s) per image" in log
    assert len(list(store.iterdir())) == 4 and len(_store_probes(store)) == 4
    table = (out / "sweep.md").read_text()
    body = [ln for ln in table.splitlines() if re.match(r"\| \d+ \| \d+ \|", ln)]
    assert sorted(ln.split(" | ")[:2] for ln in body) == [["| 1", "0"], ["| 1", "10"], ["| 3", "0"], ["| 3", "10"]]
    rec = json.loads((out / "eval.json").read_text())
    assert len(rec["sweep"]) == 4 and {(r["k"], r["t"]) for r in rec["sweep"]} == {(1, 0), (1, 10), (3, 0), (3, 10)}
    assert all(r["paper_scale_matches"] is False for r in rec["sweep"])
    assert len([r for r in rec["rows"] if r["protocol"].startswith("linear (fast")]) == 4
    # Nothing changed: every store is reused.
    stamps = {p: p.stat().st_mtime_ns for p in store.rglob("*.feat")}
    assert driver.main(base + sweep) == 0
    assert "reusing 4, nothing to write" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.feat")} == stamps
    # A single probe at one of the sweep's (k, t) reads the sweep's store.
    assert driver.main(base + ["--probe-depth", "3", "--probe-t", "10"]) == 0
    assert "reusing the feature store" in capsys.readouterr().out and len(list(store.iterdir())) == 4
    # One more t: only its stores are written, one forward per image.
    assert driver.main(base + ["--probe-depths", "1,3", "--probe-ts", "0,10,20"]) == 0
    assert "reusing 4, writing 2 from one pass over the images, 1 forward(s) per image" in capsys.readouterr().out
    assert len(list(store.iterdir())) == 6 and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # A store whose pass was killed (no manifest) is written again, alone.
    killed = next(p for p in stamps)
    (killed.parent / "manifest.json").unlink()
    assert driver.main(base + sweep) == 0
    assert "reusing 3, writing 1 from one pass over the images, 1 forward(s) per image" in capsys.readouterr().out
    assert killed.stat().st_mtime_ns != stamps[killed]
    assert all(p.stat().st_mtime_ns == v for p, v in stamps.items() if p.parent != killed.parent)


def test_driver_refuses_a_sweep_it_cannot_run(tiny_run, capsys):
    from ldae_fast.eval import driver

    tmp, ckpt, data = tiny_run
    base = ["--checkpoint", str(ckpt), "--data", str(data), "--protocols", "linear-fast", "--no-baseline",
            "--no-pixels", "--feature-store", str(tmp / "store2"), "--out", str(tmp / "out2")]
    cases = [(["--probe-ts", "0,10", "--probe-sigma", "0.1"], "probe_sigma"),
             (["--probe-depths", "5"], "blocks"),
             (["--probe-depths", "1,x"], "--probe-depths"),
             (["--probe-depths", "1", "--protocols", "knn"], "add linear-fast")]
    for extra, words in cases:
        assert driver.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert words in err, (extra, err)
    assert not (tmp / "store2").exists()


def test_eval_doc_flop_figures_are_the_codes():
    """docs/eval.md's on-paper estimate quotes the code's FLOP counter for ViT-1/2L."""
    from ldae_fast.methods.ldae.model import flops_per_image

    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "eval.md").read_text().split())
    cfg = build_config("ldae-vithalfl", {})
    less = build_config("ldae-vithalfl", {"model.decoder_depth": "11"})
    full, fewer = flops_per_image(cfg.model, cfg.ldae, 256) / 1e9, flops_per_image(less.model, less.ldae, 256) / 1e9
    block, embed = full - fewer, 2 * 256 * 768 * 1024 / 1e9
    assert f"gives {full:.2f} GFLOP" in text and f"{fewer:.2f} with one block fewer" in text
    assert f"{block:.2f} GFLOP per block" in text and f"plus {embed:.2f} for the patch embedding" in text
    # k blocks (each with its adaLN map) + the patch embedding + the sigma embedder (per image).
    a = cfg.model.width // 4  # ldae.layout='dit', adaln_dim 0
    for k, shown in ((12, "80.97 at k = 12"), (15, "101.1 at k = 15")):
        probe = k * block + embed + 2 * (256 * a + a * a) / 1e9
        assert shown.split(" at")[0] == (f"{probe:.2f}" if k == 12 else f"{probe:.1f}"), (k, probe)
        assert shown in text
