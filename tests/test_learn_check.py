"""bench/learn_check.py: the --toy rehearsal end to end on one train and one val shard, and its
one-line errors."""

from __future__ import annotations

import json

import pytest
from bench_import import load_bench


def test_toy_rehearsal_writes_rows_for_both_encoders(tmp_path, capsys, tinyimagenet_dir):
    d = tinyimagenet_dir
    out = tmp_path / "learn.json"
    rc = load_bench("learn_check").main(["--data-dir", str(d), "--train-shards", "1", "--val-shards", "1",
                             "--budget-s", "3", "--out", str(out), "--toy", "--device", "cpu",
                             "--floor-seeds", "2", "--cache-dir", str(tmp_path / "cache"),
                             "--run-dir", str(tmp_path / "runs")])
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [r["encoder"] for r in rows] == ["pretrained", "random-init", "random-init"]
    assert [r["seed"] for r in rows[1:]] == [0, 1]
    pre = rows[0]
    assert pre["steps"] >= 1 and pre["images_seen"] == pre["steps"] * 32 and pre["train_s"] > 0
    for r in rows:
        assert 0 <= r["knn_top1"] <= 100 and 0 <= r["probe_top1"] <= 100
        assert r["classes"] == 10 and r["img_size"] == 16
        for k in ("device", "torch", "triton", "date", "command"):
            assert k in r
        assert "learn_check.py" in r["command"] and "--toy" in r["command"]
    # The budget stops the run near 3 s of steps even if the calibration was off.
    assert pre["train_s"] < 30
    assert doc["meta"]["train_shards"] == ["train-000000.tar.gz"]
    assert doc["stages"]["pretrain"]["steps"] == pre["steps"]
    s = doc["summary"]
    assert s["floor_seeds"] == 2 and s["chance"] == pytest.approx(10.0)
    assert s["knn_margin"] == pytest.approx(pre["knn_top1"] - (rows[1]["knn_top1"] + rows[2]["knn_top1"]) / 2)
    printed = capsys.readouterr().out
    assert "| pretrained | 0 |" in printed and "random-init floor over 2 seeds" in printed


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    mod = load_bench("learn_check")
    rc = mod.main(["--data-dir", str(tmp_path / "nope"), "--train-shards", "1", "--val-shards", "1",
                   "--budget-s", "1", "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--data-dir" in err and "\n" not in err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train-000000.tar.gz").write_bytes(b"")
    rc = mod.main(["--data-dir", str(tmp_path / "d"), "--train-shards", "2", "--val-shards", "1",
                   "--budget-s", "1", "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--train-shards 2" in err and "holds 1" in err
    assert not (tmp_path / "x.json").exists()


def test_curve_rows_and_their_plot(tmp_path, capsys, tinyimagenet_dir):
    """--curve-every keeps every checkpoint and evaluates each; bench/plot_curve.py draws them."""
    d = tinyimagenet_dir
    out = tmp_path / "curve.json"
    rc = load_bench("learn_check").main(["--data-dir", str(d), "--train-shards", "1", "--val-shards", "1",
                             "--budget-s", "60", "--steps", "4", "--curve-every", "2", "--out", str(out),
                             "--toy", "--device", "cpu", "--floor-seeds", "1", "--pixel-floor",
                             "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "runs")])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    curve = [r for r in rows if r["encoder"] == "pretrained@step"]
    assert [r["steps"] for r in curve] == [2] and curve[0]["images_seen"] == 2 * 32
    assert rows[0]["encoder"] == "pretrained" and rows[0]["steps"] == 4
    raw = [r for r in rows if r["encoder"] == "raw pixels"]
    assert len(raw) == 1 and 0 <= raw[0]["probe_top1"] <= 100 and 0 <= raw[0]["knn_top1"] <= 100
    plot = load_bench("plot_curve")
    assert plot.curve_points(json.loads(out.read_text()), "probe_top1")[0][0] == 64
    png = tmp_path / "curve.png"
    assert plot.main([str(out), "--out", str(png)]) == 0
    from PIL import Image
    assert Image.open(png).size == (2 * plot.W, plot.H)
    assert "64, " in capsys.readouterr().out


def _doc(seed, probe, knn, steps=10, blr=1e-3):
    rows = [{"encoder": "pretrained", "seed": seed, "probe_top1": probe, "knn_top1": knn, "knn_raw_top1": knn,
             "images_seen": steps * 32, "train_s": 5.0}]
    rows += [{"encoder": "random-init", "seed": s, "probe_top1": 10.0 + s, "knn_top1": 8.0, "knn_raw_top1": 8.0}
             for s in range(3)]
    rows.append({"encoder": "raw pixels", "seed": "-", "probe_top1": 30.0, "knn_top1": 25.0, "knn_raw_top1": 24.0})
    return {"meta": {"setup": {"blr": blr}, "train_shards": ["a"], "val_shards": ["b"]},
            "stages": {"pretrain": {"steps": steps}}, "rows": rows, "summary": {"chance": 5.0}}


def test_learn_seeds_assembles_pretraining_seeds_beside_the_floors(tmp_path, capsys):
    mod = load_bench("learn_seeds")
    paths = []
    for s, (p, k) in enumerate(((20.0, 9.0), (22.0, 10.0), (24.0, 11.0))):
        paths.append(tmp_path / f"s{s}.json")
        paths[-1].write_text(json.dumps(_doc(s, p, k)))
    assert mod.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert "probe 22.00 ± 2.00, kNN 10.00 ± 1.00" in out  # mean ± sample std of the three seeds
    assert "random-init over 3 seeds: probe 11.00 ± 1.00" in out and "probe +11.00" in out
    assert "| raw pixels | - | 30.00 | 25.00 |" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_doc(3, 1.0, 1.0, steps=11)))
    assert mod.main([str(paths[0]), str(bad)]) == 2 and "--steps" in capsys.readouterr().err
    bad.write_text(json.dumps(_doc(3, 1.0, 1.0, blr=1.0)))
    assert mod.main([str(paths[0]), str(bad)]) == 2 and "setup" in capsys.readouterr().err


def test_whitening_is_fitted_on_train_features_only(monkeypatch):
    """The whitened kNN's map sees the train features alone: changing val changes nothing it is
    fitted on, and the whitened column differs from the centred one on anisotropic features."""
    import torch

    import ldae_fast.eval.rows as rows

    lc = load_bench("learn_check")
    seen = []
    real = rows.fit_tensor

    def spy(x, kind, *a, **k):
        seen.append((x.clone(), kind))
        return real(x, kind, *a, **k)

    monkeypatch.setattr(rows, "fit_tensor", spy)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    # Class signal in a low-variance direction, a large class-free direction on top.
    scale = torch.tensor([500.0, 300.0, 200.0, 1.0])
    ftr = torch.randn(300, 4, generator=g) * scale
    ftr[:, 3] += y.float() * 3
    yva = torch.arange(90) % 3
    fva = torch.randn(90, 4, generator=g) * scale
    fva[:, 3] += yva.float() * 3
    r1 = lc.evaluate_features(ftr, fva, y, yva, torch.device("cpu"), 2, 3, 0.0)
    r2 = lc.evaluate_features(ftr, fva * 3 + 7, y, yva, torch.device("cpu"), 2, 3, 0.0)
    assert [k for _, k in seen] == ["whitened", "whitened"]
    for x, _ in seen:
        assert torch.equal(x, ftr)  # the val features never reach the fit
    assert r1["knn_whitened_top1"] > r1["knn_top1"] + 20  # whitening lifts the buried direction
    assert 0 <= r2["knn_whitened_top1"] <= 100


def test_eval_only_reproduces_the_run_and_copies_its_pretraining(tmp_path, capsys, tinyimagenet_dir):
    d = tinyimagenet_dir
    out = tmp_path / "run.json"
    lc = load_bench("learn_check")
    common = ["--cache-dir", str(tmp_path / "cache")]
    rc = lc.main(["--data-dir", str(d), "--train-shards", "1", "--val-shards", "1", "--budget-s", "60",
                  "--steps", "2", "--out", str(out), "--toy", "--device", "cpu", "--floor-seeds", "1",
                  "--pixel-floor", "--run-dir", str(tmp_path / "runs"), *common])
    assert rc == 0
    again = tmp_path / "again.json"
    assert lc.main(["--eval-only", str(tmp_path / "runs"), "--from", str(out), "--out", str(again), *common]) == 0
    a, b = json.loads(out.read_text()), json.loads(again.read_text())
    assert b["stages"] == a["stages"] and b["meta"]["setup"] == a["meta"]["setup"]
    assert b["meta"]["command"] == a["meta"]["command"] and "--eval-only" in b["meta"]["eval_only"]["command"]
    assert [(r["encoder"], r["seed"]) for r in b["rows"]] == [(r["encoder"], r["seed"]) for r in a["rows"]]
    for ra, rb in zip(a["rows"], b["rows"]):
        for k in ("knn_top1", "knn_k", "knn_raw_top1", "knn_whitened_top1", "probe_top1", "probe_blr",
                  "images_seen", "steps", "train_s"):
            assert rb[k] == ra[k], (ra["encoder"], k)
    assert b["summary"]["knn_whitened_margin"] == a["summary"]["knn_whitened_margin"]
    # Nothing to evaluate, or no --from: one line, exit 2.
    capsys.readouterr()
    assert lc.main(["--eval-only", str(tmp_path / "runs"), "--out", str(again)]) == 2
    assert "--from" in capsys.readouterr().err
    assert lc.main(["--eval-only", str(tmp_path), "--from", str(out), "--out", str(again), *common]) == 2
    assert "pretrain/checkpoints" in capsys.readouterr().err


def test_learn_seeds_shows_a_dash_for_files_without_the_whitened_knn(tmp_path, capsys):
    mod = load_bench("learn_seeds")
    paths = []
    for s in range(2):
        doc = _doc(s, 20.0 + s, 9.0)
        if s == 1:
            for r in doc["rows"]:
                r["knn_whitened_top1"] = 30.0 if r["encoder"] == "pretrained" else 12.0
        paths.append(tmp_path / f"s{s}.json")
        paths[-1].write_text(json.dumps(doc))
    assert mod.main([str(paths[0])]) == 0
    out = capsys.readouterr().out
    assert "| pretrained | 0 | 20.00 | 9.00 | - | 9.00 |" in out and "whitened kNN" not in out.split("\n\n")[1]
    assert mod.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert "| pretrained | 1 | 21.00 | 9.00 | 30.00 | 9.00 |" in out
    # The floors' whitened kNN comes from the second file, the only one that measured it.
    assert "| random-init | 0 | 10.00 | 8.00 | 12.00 | 8.00 |" in out
    assert "whitened kNN 30.00" in out and "whitened kNN +18.00" in out


def test_learn_seeds_combines_the_files_floors_and_refuses_floors_that_disagree(tmp_path, capsys):
    mod = load_bench("learn_seeds")
    docs = [_doc(0, 20.0, 9.0), _doc(1, 22.0, 10.0)]
    # The second run measured two more random-init seeds and no raw pixels; seeds 0-2 agree.
    docs[1]["rows"] += [{"encoder": "random-init", "seed": s, "probe_top1": 10.0 + s, "knn_top1": 8.0,
                         "knn_raw_top1": 8.0} for s in (3, 4)]
    docs[1]["rows"] = [r for r in docs[1]["rows"] if r["encoder"] != "raw pixels"]
    paths = [tmp_path / "s0.json", tmp_path / "s1.json"]
    for p, d in zip(paths, docs):
        p.write_text(json.dumps(d))
    assert mod.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert [ln.split("|")[2].strip() for ln in out.splitlines() if ln.startswith("| random-init")] == \
        ["0", "1", "2", "3", "4"]
    assert "random-init over 5 seeds: probe 12.00 ± 1.58" in out
    assert out.count("| raw pixels |") == 1
    # Seed 1's floor measured differently in the second file: not one experiment's floor.
    next(r for r in docs[1]["rows"] if r["encoder"] == "random-init" and r["seed"] == 1)["probe_top1"] = 15.0
    paths[1].write_text(json.dumps(docs[1]))
    assert mod.main([str(p) for p in paths]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "random-init seed 1" in err and "probe_top1" in err
    assert str(paths[0]) in err and str(paths[1]) in err
