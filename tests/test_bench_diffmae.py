"""DiffMAE's analytic training FLOPs against torch's FLOP counter, the trainer's MFU at the run's
mask ratio, and bench/train_step.py's `--method diffmae` rows (CPU smoke) through results_io and
make_perf_section."""

import json

import pytest
import torch
from bench_import import load_bench
from torch.utils.flop_counter import FlopCounterMode

from ldae_fast.config import build_config
from ldae_fast.methods.diffmae.flops import diffmae_train_flops_per_image
from ldae_fast.methods.diffmae.model import build_diffmae as build_model
from ldae_fast.methods.masking import random_masking


def _counted_step(model, ratio: float, batch: int = 2, img: int = 32, p: int = 4) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image as torch's counter sees one step."""
    N = (img // p) ** 2
    mk = random_masking(batch, N, ratio, seed=0, step=0)
    M = mk.ids_masked.shape[1]
    x = torch.randn(batch, 3, img, img)
    with FlopCounterMode(display=False) as fc:
        out = model(x, ids_keep=mk.ids_keep, ids_masked=mk.ids_masked, noisy=torch.randn(batch, M, 3 * p * p),
                    t=torch.arange(batch) * 7)
        fwd = fc.get_total_flops()
        out.float().square().mean().backward()
    return fwd / batch, fc.get_total_flops() / batch


def _tiny(kind: str):
    return build_config("diffmae-demo", {"diffmae.decoder_kind": kind, "model.attn_backend": "math",
                                         "model.decoder_width": "64", "model.decoder_heads": "2"})


@pytest.mark.parametrize("kind", ["joint", "cross"])
@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_analytic_training_flops_match_the_counter(kind, ratio):
    cfg = _tiny(kind)
    fwd, total = _counted_step(build_model(cfg.model, cfg.diffmae, 32), ratio)
    a_fwd, a_total = diffmae_train_flops_per_image(cfg.model, cfg.diffmae, 32, ratio)
    assert a_fwd == pytest.approx(fwd, rel=1e-9)
    assert a_total == pytest.approx(total, rel=1e-9)
    # Not a plain 3 x forward: the three input embeddings get weight gradients only.
    assert a_total < 3 * a_fwd
    # The masked encoder sees fewer tokens at a higher ratio, so the count must follow it.
    assert diffmae_train_flops_per_image(cfg.model, cfg.diffmae, 32, 0.9)[1] < a_total < \
        diffmae_train_flops_per_image(cfg.model, cfg.diffmae, 32, 0.25)[1]


def test_timm_peer_flops_are_ours_without_adaln(ts):
    cfg = _tiny("joint")
    m = cfg.model
    from ldae_fast.methods.diffmae.bench import TimmDiffMAEPeer

    peer = TimmDiffMAEPeer(32, m.patch_size, m.width, m.encoder_depth, m.num_heads, m.decoder_width,
                              m.decoder_depth, m.decoder_heads, m.mlp_ratio)
    for blk in (*peer.blocks, *peer.decoder_blocks):
        blk.attn.fused_attn = False  # the counter then sees the two attention matmuls as matmuls
    fwd, total = _counted_step(peer, 0.75)
    a_fwd, a_total = diffmae_train_flops_per_image(m, cfg.diffmae, 32, 0.75, adaln=False)
    assert (a_fwd, a_total) == (pytest.approx(fwd, rel=1e-9), pytest.approx(total, rel=1e-9))
    assert a_total < diffmae_train_flops_per_image(m, cfg.diffmae, 32, 0.75)[1]


def test_trainer_mfu_counts_the_configured_mask_ratio(tmp_path):
    from ldae_fast.engine.loop import train

    over = {
        "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
        "model.decoder_heads": "2", "data.img_size": "16", "data.batch_size": "4", "data.synthetic_images": "32",
        "engine.kernels": "reference", "engine.log_every": "1", "engine.progress": "false",
        "eval.probe": "false", "eval.figure": "false", "diffmae.sample_steps": "8", "engine.steps": "2",
        "diffmae.mask_ratio": "0.5", "optim.warmup_epochs": "0", "engine.out_dir": str(tmp_path / "run"),
    }
    cfg = build_config("diffmae-demo", over)
    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_image = diffmae_train_flops_per_image(cfg.model, cfg.diffmae, 16, 0.5)[1]
    other = diffmae_train_flops_per_image(cfg.model, cfg.diffmae, 16, 0.75)[1]
    assert per_image > 1.1 * other  # far outside the bounds below: a 0.75 count would fail them
    for r in lines:
        # images_per_s is logged to 0.1 and tflops to 4 digits: bounds for both roundings.
        lo, hi = ((r["images_per_s"] + d) * per_image / 1e12 for d in (-0.05, 0.05))
        assert lo * (1 - 1e-3) <= r["tflops"] <= hi * (1 + 1e-3), (r, per_image)


@pytest.fixture(scope="module")
def smoke(ts, tmp_path_factory):
    """One DiffMAE smoke run (a, c, d at the toy size) written through results_io."""
    out = tmp_path_factory.mktemp("bench_diffmae")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows, meta = ts.run(["--method", "diffmae", "--cpu-smoke", "--compile-backend", "eager",
                             "--peak-tflops", "1.0", "--write", "--out-dir", str(out / "results")])
    finally:
        torch.set_num_threads(threads)
    return rows, meta, out


def test_diffmae_rows_ours_eager_and_timm_peer_from_one_run(smoke, ts, capsys):
    rows, meta, out = smoke
    assert [r["variant"] for r in rows] == ["a", "c", "d"]
    cfg = build_config("diffmae-demo", {"data.img_size": "32"})
    by = {r["variant"]: r for r in rows}
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["model"], r["method"], r["mask_ratio"], r["decoder_kind"]) == ("DiffMAE tiny", "diffmae", 0.75, "joint")
        assert (r["img"], r["patch"], r["batch"]) == (32, 4, 4)
        fwd, total = diffmae_train_flops_per_image(cfg.model, cfg.diffmae, 32, 0.75, adaln=r["variant"] != "c")
        assert (r["fwd_flops_per_image"], r["train_flops_per_image"]) == (fwd, total)
        assert r["train_gflop"] == pytest.approx(total / 1e9, rel=1e-3)
        assert r["tflops"] == pytest.approx(r["images_per_s"] * total / 1e12, rel=1e-3)
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0, rel=1e-2)
        # Ratios from the rows of this very run.
        for other in ("a", "c", "d"):
            assert r[f"vs_{other}"] == pytest.approx(r["images_per_s"] / by[other]["images_per_s"], rel=2e-3)
        assert r["vs_b"] is None
    assert by["a"]["attn"] == "math" and by["a"]["compile"] == "none" and by["a"]["optimizer"] == "AdamW default"
    assert by["c"]["attn"].startswith("timm") and by["d"]["compile"] == "blocks"
    assert by["d"]["compiled_blocks"] == cfg.model.encoder_depth + cfg.model.decoder_depth
    assert meta["method"] == "diffmae" and meta["mask_ratio"] == 0.75 and "diffmae_train_flops" in meta["flop_count"]
    assert "--method diffmae" in meta["command"]


def test_diffmae_results_import_and_render(smoke, perf, tmp_path):
    rows, _, out = smoke
    rio = load_bench("results_io")
    files = list((out / "results").glob("train_step-*.json"))
    assert len(files) == 1
    data = rio.load_results(files[0])
    assert data["name"] == "train_step" and data["meta"]["complete"] is True and len(data["rows"]) == 3
    assert rio.import_results(out / "results", tmp_path / "home")
    text = perf.render(tmp_path / "home", include_cpu=True)
    assert "| DiffMAE tiny |" in text and "--method diffmae" in text
    assert "**DiffMAE tiny**" in text and "x eager (a)" in text and "x timm peer (c)" in text
    assert perf.fmt(rows[2]["images_per_s"], "images_per_s") in text
    assert "| mask |" in text  # the mask ratio is a column of the train_step table


def test_diffmae_rows_do_not_hide_ldae_rows_of_the_same_vit(perf, tmp_path):
    """A DiffMAE ViT-B row and an l-DAE ViT-B row at the same batch are different measurements, and
    so are DiffMAE rows at two mask ratios."""
    def row(model, v, ips, **kw):
        return dict(model=model, img=224, patch=16, precision="bf16", batch=256, variant=v, variant_name=v,
                    images_per_s=ips, status="ok", **kw)

    runs = [("10:00", [row("ViT-B", "d", 1000.0)]),
            ("10:10", [row("DiffMAE ViT-B", "d", 3000.0, method="diffmae", mask_ratio=0.75, decoder_kind="joint")]),
            ("10:20", [row("DiffMAE ViT-B", "d", 2500.0, method="diffmae", mask_ratio=0.6, decoder_kind="joint")])]
    for hhmm, rs in runs:
        (tmp_path / f"train_step-{hhmm.replace(':', '')}.json").write_text(json.dumps(
            {"name": "train_step", "meta": {"gpu": "NVIDIA H200", "date": f"2026-03-01T{hhmm}:00+00:00",
                                            "command": f"python bench/train_step.py # {hhmm}"}, "rows": rs}))
    text = perf.render(tmp_path)
    assert text.count("### train_step") == 3
    for ips in ("| 1,000 |", "| 3,000 |", "| 2,500 |"):
        assert ips in text


def test_cross_decoder_and_mask_ratio_flags(ts):
    rows, meta = ts.run(["--method", "diffmae", "--cpu-smoke", "--compile-backend", "eager", "--variants", "a,c",
                         "--decoder-kind", "cross", "--mask-ratio", "0.5", "--steps", "1", "--no-write"])
    a, c = rows
    assert a["status"] == "ok" and a["decoder_kind"] == "cross" and a["mask_ratio"] == 0.5
    cfg = build_config("diffmae-demo", {"data.img_size": "32", "diffmae.decoder_kind": "cross"})
    assert a["train_flops_per_image"] == diffmae_train_flops_per_image(cfg.model, cfg.diffmae, 32, 0.5)[1]
    # timm has no cross-attention block: the row says so rather than 'failed' or a wrong peer.
    assert c["status"].startswith("n/a: timm's Block has no cross-attention") and c["images_per_s"] is None
    assert a["vs_c"] is None
    for bad in (["--mask-ratio", "1.0"], ["--decoder-kind", "unet"]):
        with pytest.raises(SystemExit, match="mask-ratio|decoder-kind"):
            ts.resolve(ts.parse_args(["--method", "diffmae", "--cpu-smoke", *bad]))


def test_gpu_defaults_are_the_papers_setting(ts):
    args = ts.parse_args(["--method", "diffmae"])
    defaults = ts.gpu_defaults("diffmae")
    assert defaults["sizes"] == "B,L" and defaults["img_size"] == 224
    assert defaults["patch_size"] == 16 and args.mask_ratio == 0.75
    assert ts.bench_of("diffmae").overrides("B") == {"model.decoder_width": 512, "model.decoder_depth": 8,
                                                     "model.decoder_heads": 16}
    vals = dict(defaults)
    assert ts.resolve_plan(args, vals) == [(256, ["a", "c", "d"])]
