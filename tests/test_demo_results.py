"""The demo's provenance: every number it prints lands in results.json with its settings and
seeds (raw-pixel row included), and bench/seed_table.py assembles seed tables from those files."""

import json
import statistics

import pytest
from bench_import import load_bench

TINY = {"model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
        "data.img_size": "16", "data.batch_size": "8", "data.synthetic_images": "64",
        "tokenizer.fit_images": "32", "engine.kernels": "reference", "engine.steps": "2",
        "engine.progress": "false", "eval.probe": "true", "eval.probe_epochs": "3", "eval.figure": "false",
        "eval.probe_batch_size": "32"}


def _seed_table():
    return load_bench("seed_table")


def _run(tmp_path, seed, capsys, **extra):
    from ldae_fast.train import main

    out = tmp_path / f"s{seed}"
    argv = ["--preset", "demo", f"--engine.seed={seed}", f"--engine.out_dir={out}"]
    argv += [f"--{k}={v}" for k, v in {**TINY, **extra}.items()]
    assert main(argv) == 0
    return out / "results.json", capsys.readouterr().out


def test_results_json_holds_every_printed_number(tmp_path, capsys):
    path, printed = _run(tmp_path, 0, capsys)
    rec = json.loads(path.read_text())
    ev = rec["evaluation"]
    assert rec["preset"] == "demo" and rec["seed"] == 0 and rec["config"]["engine"]["seed"] == 0
    assert rec["argv"][:2] == ["--preset", "demo"]
    for key, label in (("probe_top1", "pretrained encoder"), ("random_top1", "random-init encoder"),
                       ("raw_pixels_top1", "raw pixels"), ("chance", "chance")):
        line = next(ln for ln in printed.splitlines() if ln.strip().startswith(label))
        assert f"{ev[key]:.1f}%" in line, (key, line)
    raw_line = next(ln for ln in printed.splitlines() if ln.strip().startswith("raw pixels"))
    assert f"{ev['raw_pixels_knn_top1']:.1f}%" in raw_line
    assert 0 <= ev["raw_pixels_top1"] <= 100 and 0 <= ev["raw_pixels_knn_top1"] <= 100
    st = ev["eval_settings"]
    assert st["train_images"] > 0 and st["probe_epochs"] == 3 and st["knn_features"] == "centred"
    pt = rec["pretraining"]
    assert pt["steps"] == 2 and f"loss {pt['loss_first']:.4f} -> {pt['loss_last']:.4f}" in printed


def test_seed_table_assembles_the_files_and_refuses_mixed_experiments(tmp_path, capsys):
    paths = [_run(tmp_path, s, capsys)[0] for s in (0, 1)]
    st = _seed_table()
    recs = st.load(paths)
    st.check_same_experiment(recs)
    md = st.table(recs, "demo")
    vals = [json.loads(p.read_text())["evaluation"]["probe_top1"] for p in paths]
    assert f"| 0 | {vals[0]:.1f}%" in md and f"| 1 | {vals[1]:.1f}%" in md
    assert f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" in md
    assert "probe, raw pixels" in md and str(paths[0]) in md
    other, _ = _run(tmp_path, 2, capsys, **{"optim.blr": "1e-2"})
    assert st.main([str(paths[0]), str(other)]) == 2
    assert "optim.blr" in capsys.readouterr().err
    # --summary groups them instead: one line per experiment, labelled by what differs.
    assert st.main(["--summary", *map(str, paths), str(other)]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| optim.blr=")]
    assert len(rows) == 2 and any("| 0,1 |" in r for r in rows) and any("| 2 |" in r for r in rows)
    with pytest.raises(st.TableError, match="not a readable"):
        st.load([tmp_path / "missing.json"])
    # A file written before a field moved (ldae.layout was model.layout) is a seed of the same
    # experiment: settings are compared as this version reads them.
    rec = json.loads(paths[1].read_text())
    rec["config"]["model"]["layout"] = rec["config"]["ldae"].pop("layout")
    older = tmp_path / "older.json"
    older.write_text(json.dumps(rec))
    st.check_same_experiment(st.load([paths[0], older]))
    assert st.main(["--summary", str(paths[0]), str(older)]) == 0
    assert "| (one experiment) | 0,1 |" in capsys.readouterr().out


def test_whitened_knn_rows_old_files_and_reevaluation(tmp_path, capsys):
    """results.json carries the whitened kNN (printed too); a file written before it existed still
    assembles (a dash); bench/demo_reeval.py recomputes a run's evaluation from its checkpoint and
    reproduces the run's own numbers without writing into the run."""
    path, printed = _run(tmp_path, 0, capsys)
    rec = json.loads(path.read_text())
    ev = rec["evaluation"]
    for key, label in (("knn_whitened_top1", "pretrained encoder"), ("random_knn_whitened_top1", "random-init"),
                       ("raw_pixels_knn_whitened_top1", "raw pixels")):
        assert 0 <= ev[key] <= 100
        line = next(ln for ln in printed.splitlines() if ln.strip().startswith(label))
        assert line.rstrip().endswith(f"{ev[key]:.1f}%"), (key, line)
    old = tmp_path / "old.json"
    rec_old = json.loads(path.read_text())
    for k in ("knn_whitened_top1", "random_knn_whitened_top1", "raw_pixels_knn_whitened_top1"):
        del rec_old["evaluation"][k]
    old.write_text(json.dumps(rec_old))
    st = _seed_table()
    md = st.table(st.load([old]))
    assert "whitened" not in md.split("\n\n")[0]  # no column nobody measured
    md = st.table(st.load([old, path]))
    assert "kNN (whitened), pretrained" in md
    row_old = next(ln for ln in md.splitlines() if ln.startswith("| 0 |") and "| - |" in ln)
    assert [c.strip() for c in row_old.split("|")].count("-") == 3

    mod = load_bench("demo_reeval")
    before = sorted(p.name for p in path.parent.rglob("*"))
    out = tmp_path / "again.json"
    assert mod.main([str(path.parent), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert sorted(p.name for p in path.parent.rglob("*")) == before
    assert again["pretraining"] == rec["pretraining"] and again["argv"] == rec["argv"]
    assert again["reevaluated"]["original_evaluation"] == ev
    for k in ("probe_top1", "random_top1", "raw_pixels_top1", "knn_top1", "random_knn_top1", "raw_pixels_knn_top1",
              "knn_whitened_top1", "random_knn_whitened_top1", "raw_pixels_knn_whitened_top1"):
        assert again["evaluation"][k] == ev[k], k
    assert again["evaluation"]["eval_settings"]["weights"] == ev["eval_settings"]["weights"]
    capsys.readouterr()
    assert mod.main([str(tmp_path / "nope"), "--out", str(out)]) == 4  # README "Exit codes": a file
    err = capsys.readouterr().err.strip()
    assert "results.json" in err and "\n" not in err
