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
