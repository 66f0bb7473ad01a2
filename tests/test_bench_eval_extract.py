"""bench/eval_extract.py runs both paths on the same images and reports their ratio."""

from bench_import import load_bench


def test_eval_extract_bench_smoke(capsys):
    mod = load_bench("eval_extract")
    rows = mod.main(["--images", "48", "--img-size", "32", "--size", "tiny", "--patch", "8", "--workers", "0",
                     "--batch-size", "16"])
    paths = [r["path"] for r in rows]
    assert paths[0].startswith("ours") and paths[1].startswith("peer")
    # Every image after the untimed first batch is counted, on both paths.
    assert all(r["images"] == 32 and r["images_per_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "reproduce: " in out and "ours / peer = " in out
