"""bench/data.py runs end to end with tiny counts on CPU and reports every stage it can run here."""

import json

from bench_import import load_bench


def test_data_bench_cpu_smoke(tmp_path, capsys):
    bench = load_bench("data")
    shards = bench.DEFAULT_SHARDS
    use_real = (shards.parent / "train-000000.tar.gz").exists()
    rows = bench.main(["--shards", str(shards) if use_real else "none", "--synthetic", "16", "--batch-size", "4",
                       "--batches", "2", "--raw-images", "40", "--workers", "0,1", "--no-gpu", "--write",
                       "--out-dir", str(tmp_path), "--profile", str(tmp_path / "prof"),
                       "--profile-batches", "1"])
    datasets = ["shards", "synthetic-256"] if use_real else ["synthetic-256"]
    got = {(r["dataset"], r["stage"], r["workers"]) for r in rows}
    want = {(d, s, w) for d in datasets for s, w in (("raw", 0), ("cpu_decode", 0), ("cpu_decode", 1))}
    assert got == want
    for r in rows:
        assert r["images_per_s"] > 0 and r["images"] > 0
    assert all(r["MB_per_s"] > 0 for r in rows if r["stage"] == "raw")
    out = capsys.readouterr().out
    assert "reproduce: " in out and "bench/data.py" in out
    (js,) = tmp_path.glob("data-*.json")
    saved = json.loads(js.read_text())
    assert saved["meta"]["command"].endswith("--profile-batches 1") and len(saved["rows"]) == len(rows)
    assert (tmp_path / "data.md").exists()
    traced = {(t.parent.parent.name, t.parent.name) for t in (tmp_path / "prof").glob("*/*/profile_top_kernels.md")}
    assert traced == {(d, f"cpu_decode_w{w}") for d in datasets for w in (0, 1)}
