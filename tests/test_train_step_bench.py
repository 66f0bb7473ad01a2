"""bench/train_step.py in its CPU smoke mode, and bench/make_perf_section.py on its output."""

import json
import os

import pytest
import torch

from ldae_fast.config import ModelConfig
from ldae_fast.methods.ldae.model import flops_per_image


@pytest.fixture(scope="module")
def smoke(ts, tmp_path_factory):
    """One smoke run shared by the tests below: it is the slow part (about 10 s)."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core runner OpenMP spinning across busy cores costs 5-10x.
    torch.set_num_threads(1)
    try:
        # Backend 'eager': Dynamo still traces (fake tensors, guards, graph breaks) but skips
        # AOT autograd and inductor's C++ codegen, which cost 10 s to minutes on 2 cores.
        rc = ts.main(["--cpu-smoke", "--compile-backend", "eager", "--peak-tflops", "1.0",
                      "--profile", str(out / "prof"), "--profile-steps", "1",
                      "--write", "--out-dir", str(out / "results")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    files = list((out / "results").glob("train_step-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    return data["rows"], data["meta"], out


def test_one_row_per_variant_with_throughput(smoke):
    rows, meta, _ = smoke
    assert [r["variant"] for r in rows] == ["a", "b", "c", "d"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["tflops"] > 0
        assert (r["model"], r["batch"], r["img"], r["patch"]) == ("tiny", 4, 32, 4)
    assert meta["smoke"] is True and meta["timed_steps"] == 2 and meta["warmup_steps"] == 1
    assert rows[0]["vs_a"] == 1.0 and rows[3]["vs_b"] is not None and rows[3]["vs_c"] is not None
    assert rows[3]["compile"] == "blocks" and rows[3]["compiled_blocks"] == 6
    assert rows[0]["attn"] == "math" and rows[0]["kernels"] == "reference"


def test_flops_are_three_forwards(smoke):
    rows, meta, _ = smoke
    # The paper's layout: N tokens, no class token (the bench's default, --layout dit).
    from ldae_fast.methods.ldae.config import LDAEConfig

    dit = LDAEConfig(layout="dit")
    ours = flops_per_image(ModelConfig(size="tiny", patch_size=4), dit, 32)
    peer = flops_per_image(ModelConfig(size="tiny", patch_size=4), LDAEConfig(layout="dit", cond="none"), 32)
    assert all(r["layout"] == "dit" and r["tokens"] == 64 for r in rows)
    for r in rows:
        fwd = peer if r["variant"] == "c" else ours
        assert r["fwd_flops_per_image"] == fwd
        assert r["train_flops_per_image"] == 3 * fwd
        achieved = r["images_per_s"] * r["train_flops_per_image"] / 1e12
        assert r["tflops"] == pytest.approx(achieved, rel=1e-3)
        assert r["mfu"] == pytest.approx(r["tflops"] / meta["peak_tflops"], rel=1e-2)
    assert meta["peak_tflops"] == 1.0 and meta["peak_source"] == "--peak-tflops"


def test_variant_d_kernels_follow_interpreter(smoke):
    d = smoke[0][3]
    if os.environ.get("TRITON_INTERPRET") == "1":
        from ldae_fast.kernels import triton_available

        if triton_available():
            assert d["kernels"] == "triton" and "interpreter" in d["note"]
            return
    assert d["kernels"] == "reference" and "reference" in d["note"]


def test_profile_and_command(smoke):
    rows, meta, out = smoke
    traces = list((out / "prof").glob("tiny_b4_d/trace_step*.json"))
    assert len(traces) == 1 and rows[3]["profile"] == str(traces[0])
    assert (out / "prof" / "tiny_b4_d" / "profile_top_kernels.md").stat().st_size > 0
    assert "bench/train_step.py" in meta["command"] and "--cpu-smoke" in meta["command"]
    assert (out / "results" / "train_step.md").exists()


def test_failing_variant_becomes_a_row(ts, monkeypatch):
    s = ts.Setup(size="tiny", batch=4, img_size=32, patch_size=4, latent_dim=16,
                 device=torch.device("cpu"), amp=None, warmup=0, steps=1)

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")

    monkeypatch.setattr(ts, "build_variant", oom)
    row = ts.run_variant("a", s, peak=None)
    assert row["status"] == "OOM" and row["images_per_s"] is None

    def broken(*a, **k):
        raise ValueError("no such kernel\nsecond line")

    monkeypatch.setattr(ts, "build_variant", broken)
    row = ts.run_variant("d", s, peak=None)
    assert row["status"] == "failed: ValueError: no such kernel" and row["mfu"] is None
    ts.add_ratios([row])
    assert row["vs_a"] is None


def test_cpu_smoke_takes_explicit_flags_and_refuses_bad_ones(ts):
    vals, device, smoke = ts.resolve(ts.parse_args(["--cpu-smoke"]))
    assert smoke and device.type == "cpu" and vals == ts.CPU_SMOKE
    vals, _, _ = ts.resolve(ts.parse_args(["--cpu-smoke", "--steps", "5", "--batch-sizes", "2,3"]))
    assert vals["steps"] == 5 and vals["batch_sizes"] == "2,3" and vals["sizes"] == "tiny"
    for bad in (["--steps", "0"], ["--warmup", "-1"], ["--batch-sizes", "4,0"], ["--batch-sizes", "x"]):
        with pytest.raises(SystemExit, match="must be|integers"):
            ts.resolve(ts.parse_args(["--cpu-smoke", *bad]))


def test_peak_table(ts):
    assert ts.peak_tflops_for("NVIDIA H100 80GB HBM3") == (989.0, "H100 SXM")
    assert ts.peak_tflops_for("NVIDIA H100 PCIe")[0] == 756.0
    assert ts.peak_tflops_for("NVIDIA GH200 480GB")[1] == "GH200"
    assert ts.peak_tflops_for("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert ts.peak_tflops_for("NVIDIA A10G")[0] is None  # not the A10: no guess


def test_perf_section_from_results(smoke, perf):
    rows, _, out = smoke
    # CPU smoke runs are not performance results: left out unless asked for.
    assert "No GPU results are committed yet" in perf.render(out / "results")
    text = perf.render(out / "results", include_cpu=True)
    assert "### train_step" in text and "bench/train_step.py" in text
    assert perf.fmt(rows[3]["images_per_s"], "images_per_s") in text


def test_perf_section_gpu_run_and_empty(perf, tmp_path, capsys):
    assert perf.main(["--results-dir", str(tmp_path)]) == 0
    assert "No GPU results are committed yet" in capsys.readouterr().out
    rows = [dict(model="ViT-1/2L", batch=256, variant=v, variant_name=n, images_per_s=ips, mfu=m,
                 peak_mem_gib=50.0, status="ok", vs_a=ips / 500.0)
            for v, n, ips, m in (("a", "eager", 500.0, 0.25), ("d", "ldae-fast", 1000.0, 0.5))]
    for date, r in (("2026-01-01T00:00:00+00:00", rows[:1]), ("2026-02-01T00:00:00+00:00", rows)):
        (tmp_path / f"train_step-{date[:10]}.json").write_text(json.dumps(
            {"name": "train_step", "meta": {"gpu": "NVIDIA H100 80GB HBM3", "date": date,
                                            "command": "python bench/train_step.py"}, "rows": r}))
    (tmp_path / "broken.json").write_text("{")
    text = perf.render(tmp_path)
    assert text.count("### train_step") == 1 and "2026-02-01" in text  # newest run per GPU
    assert "**ViT-1/2L**: 1,000 images/s at micro-batch 256, MFU 50.0%" in text
    assert perf.render(tmp_path, all_runs=True).count("### train_step") == 2


def test_perf_section_keeps_every_command_of_a_gpu_session(perf, tmp_path):
    """A GPU session runs train_step once per model: each command's rows stay, and only rows a
    newer run measured again are dropped from the older run."""
    def row(model, batch, v, ips, **kw):
        return dict(model=model, batch=batch, variant=v, variant_name=v, images_per_s=ips,
                    status="ok", **kw)

    runs = [
        ("2026-03-01T10:00:00+00:00", "--sizes halfL",
         [row("ViT-1/2L", 128, "a", 400.0), row("ViT-1/2L", 128, "d", 1000.0, vs_a=2.5, vs_c=1.4),
          row("ViT-1/2L", 256, "d", 1100.0), row("ViT-1/2L", 64, "a", 380.0)]),
        ("2026-03-01T10:10:00+00:00", "--sizes B", [row("ViT-B", 256, "d", 1900.0)]),
        ("2026-03-01T10:20:00+00:00", "--sizes halfL --batches 64", [row("ViT-1/2L", 64, "a", 390.0)]),
    ]
    for date, args, rows in runs:
        (tmp_path / f"train_step-{date[11:16].replace(':', '')}.json").write_text(json.dumps(
            {"name": "train_step", "meta": {"gpu": "NVIDIA H100 80GB HBM3", "date": date,
                                            "command": f"python bench/train_step.py {args}"},
             "rows": rows}))
    text = perf.render(tmp_path)
    assert text.count("### train_step") == 3
    for args in ("--sizes halfL\n", "--sizes B\n", "--sizes halfL --batches 64\n"):
        assert args in text
    assert "| 380.0 |" not in text and "| 390.0 |" in text  # re-measured: from the newer run
    # The headline: fastest (d), ratios from the batch where the baselines ran.
    assert "**ViT-1/2L**: 1,100 images/s at micro-batch 256" in text
    assert "2.50x eager (a), 1.40x timm peer (c) (at micro-batch 128)" in text
    assert "**ViT-B**: 1,900 images/s at micro-batch 256" in text
    assert perf.render(tmp_path, all_runs=True).count("| 380.0 |") == 1


def test_cudagraph_rows_count_the_graphs_inductor_skipped(ts, monkeypatch):
    from torch._dynamo.utils import counters

    def timed(step, x, warmup, steps, device):  # stands in for a run where inductor skips one
        counters["inductor"]["cudagraph_skips"] += 1
        return 1.0, torch.tensor(0.0)

    monkeypatch.setattr(ts, "time_steps", timed)
    s = ts.Setup(size="tiny", batch=2, img_size=32, patch_size=4, latent_dim=16, device=torch.device("cpu"),
                 amp=None, warmup=0, steps=1)
    row = ts.run_variant("d+graphs", s, peak=None, compile_backend="eager")
    assert row["status"] == "ok" and row["cudagraph_skips"] == 1
    assert "cudagraph_skips" not in ts.run_variant("d", s, peak=None, compile_backend="eager")


def test_perf_section_in_the_order_the_gpu_session_runs(perf, tmp_path):
    """halfL_b128 (a-d), halfL_b256 (d), then ablations (d + its ablations at 128): the later
    (d) at 128 must not hide the one the baselines' ratios belong to, and the summary shows the
    fastest (d) with the ratios of the run where the baselines ran."""
    def row(v, batch, ips, **kw):
        return dict(model="ViT-1/2L", img=256, patch=16, precision="bf16", batch=batch, variant=v,
                    variant_name=v, images_per_s=ips, status="ok", **kw)

    runs = [("10:00", [row("a", 128, 450.0), row("d", 128, 1000.0, vs_a=2.222, vs_b=1.5, vs_c=1.3)]),
            ("10:10", [row("d", 256, 1100.0, peak_reserved_gib=70.5)]),
            ("10:20", [row("d", 128, 990.0, vs_d=1.0), row("d+adaln", 128, 1050.0, vs_d=1.061)]),
            ("10:30", [row("a", 128, 500.0)])]  # (a) again, alone: its old ratios must stay put
    for hhmm, rows in runs:
        (tmp_path / f"train_step-{hhmm.replace(':', '')}.json").write_text(json.dumps(
            {"name": "train_step", "meta": {"gpu": "NVIDIA H100 80GB HBM3",
                                            "date": f"2026-03-01T{hhmm}:00+00:00",
                                            "command": f"python bench/train_step.py # {hhmm}"},
             "rows": rows}))
    text = perf.render(tmp_path)
    assert text.count("### train_step") == 4
    assert "| 1,000 |" in text and "| 990.0 |" in text and "| 450.0 |" in text
    summary = text.split("### train_step")[0]
    assert ("**ViT-1/2L**: 1,100 images/s at micro-batch 256, 70.5 GiB peak reserved, 2.22x eager (a), "
            "1.50x compiled (b), 1.30x timm peer (c) (at micro-batch 128)") in summary


def test_ablations_of_d_run_and_compare_with_d(ts):
    """'ablations' expands to (d) with one switch changed each; every row is measured against
    the (d) of the same run, and says what it changed."""
    rows, meta = ts.run(["--cpu-smoke", "--compile-backend", "eager", "--variants", "d,ablations,d",
                         "--no-write"])
    assert [r["variant"] for r in rows] == ["d", *ts.ABLATIONS]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rows), rows
    by = {r["variant"]: r for r in rows}
    assert by["d"]["vs_d"] == 1.0
    for key in ts.ABLATIONS:
        assert by[key]["vs_d"] == pytest.approx(by[key]["images_per_s"] / by["d"]["images_per_s"], rel=2e-3)
    assert by["d-compile"]["compile"] == "none" and by["d"]["compile"] == "blocks"
    assert by["d-triton"]["kernels"] == "reference"
    assert "reduce-overhead" in by["d+graphs"]["compile"]
    assert by["d+graphs"]["cudagraph_skips"] == 0 and "cudagraph_skips" not in by["d"]
    assert "activation ckpt" in by["d+ckpt"]["compile"]
    assert by["d+adaln"]["kernels"].endswith("fused adaLN LN")
    assert set(meta["variants"]) == {"d", *ts.ABLATIONS}


def test_plan_runs_batches_and_variants_in_the_order_written(ts):
    vals, _, _ = ts.resolve(ts.parse_args(["--cpu-smoke"]))
    plan = ts.resolve_plan(ts.parse_args(["--plan", "128:a,c,d;256:d; 128:b"]), vals)
    assert plan == [(128, ["a", "c", "d"]), (256, ["d"]), (128, ["b"])]
    assert ts.resolve_plan(ts.parse_args(["--plan", "8:d,ablations"]), vals)[0][1] == ["d", *ts.ABLATIONS]
    # Without --plan: every batch with every variant, as before.
    args = ts.parse_args(["--cpu-smoke", "--batch-sizes", "2,3", "--variants", "a,d"])
    assert ts.resolve_plan(args, ts.resolve(args)[0]) == [(2, ["a", "d"]), (3, ["a", "d"])]
    for bad, msg in ((["--plan", "128"], "BATCH:VARIANT"), (["--plan", "0:a"], "BATCH >= 1"),
                     (["--plan", "x:a"], "BATCH:VARIANT"), (["--plan", "4:z"], "unknown variant"),
                     (["--plan", ";"], "empty"), (["--plan", "4:a", "--variants", "d"], "drop --batch-sizes")):
        with pytest.raises(SystemExit, match=msg):
            ts.resolve_plan(ts.parse_args(bad), vals)


def test_budget_skips_later_variants_and_json_is_the_one_file(ts, tmp_path, monkeypatch):
    """--budget-s: no variant starts after it (a row says so); --json: that file, no markdown;
    a variant still running is on disk as 'unfinished'."""
    clock = iter(range(0, 1000, 10))  # each reading 10 s later
    monkeypatch.setattr(ts, "_clock", lambda: next(clock))
    seen = []

    def fake(key, s, peak, *a, **k):
        on_disk = json.loads((tmp_path / "ts.json").read_text())["rows"]
        seen.append(on_disk[-1]["status"])
        return dict(ts._skipped_row(key, s, "ok"), images_per_s=float(s.batch), tflops=None, mfu=None,
                    peak_mem_gib=None)

    monkeypatch.setattr(ts, "run_variant", fake)
    rows, meta = ts.run(["--cpu-smoke", "--plan", "2:a,c;4:d", "--budget-s", "25", "--json", str(tmp_path / "ts.json")])
    assert [(r["batch"], r["variant"], r["status"]) for r in rows] == [
        (2, "a", "ok"), (2, "c", "ok"), (4, "d", "skipped: time budget (--budget-s 25)")]
    assert seen == ["unfinished: the run stopped in this variant"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ts.json"]
    data = json.loads((tmp_path / "ts.json").read_text())
    assert data["meta"]["complete"] is True and data["meta"]["plan"] == "2:a,c;4:d" and len(data["rows"]) == 3
    assert rows[1]["vs_a"] == 1.0 and rows[2]["vs_d"] is None
    assert meta["results"] == [str(tmp_path / "ts.json")]


@pytest.mark.parametrize("gib", [24, 40, 79.1, 139.8, 400])
def test_memory_batch_is_the_largest_the_estimate_fits(ts, gib):
    """'auto' is the largest power of two (<= 256) at which every one of (a)-(d) fits the share of
    the card's memory by the estimate, 'max' the same for (d) alone; math attention (a, b) is
    estimated hungrier than (c), (d), so 'auto' never exceeds 'max'."""
    s = ts.Setup(size="halfL", batch=1, img_size=256, patch_size=16, latent_dim=32,
                 device=torch.device("cpu"), amp=None, warmup=0, steps=1)
    total = gib * 2**30
    params = ts._param_count(s)

    def fits(b, variants):
        t = ts.Setup(**{**s.__dict__, "batch": b})
        return all(ts.estimated_memory_bytes(t, v, params) <= ts.MEMORY_FRACTION * total for v in variants)

    for rule, variants in (("auto", "abcd"), ("max", "d")):
        b = ts.memory_batch(rule, s, total)
        assert b == 1 or fits(b, variants), (rule, b)
        assert b == ts.MAX_BATCH or not fits(2 * b, variants), (rule, b)
    assert ts.memory_batch("auto", s, total) <= ts.memory_batch("max", s, total)
    big = ts.Setup(**{**s.__dict__, "batch": 64})
    assert ts.estimated_memory_bytes(big, "a", params) > ts.estimated_memory_bytes(big, "d", params)


def test_plan_takes_memory_batches_and_targets_are_judged_in_the_output(ts):
    args = ts.parse_args(["--plan", "auto:d;max:d;64:a"])
    assert ts.resolve_plan(args, {}) == [("auto", ["d"]), ("max", ["d"]), (64, ["a"])]
    with pytest.raises(SystemExit, match="auto / max"):
        ts.resolve_plan(ts.parse_args(["--plan", "most:d"]), {})
    rows = [dict(variant="d", status="ok", mfu=0.6, vs_a=2.5, vs_b=1.1, vs_c=None),
            dict(variant="d", status="OOM", mfu=None, vs_a=9.0),
            dict(variant="d+fp8", status="failed: SpeedSwitchError: ...", vs_d=None)]
    # MFU, vs (a), vs (b), vs (c) (none measured), FP8 (its row failed); the OOM row is not a result.
    got = [t["status"] for t in ts.judge_targets(rows)]
    assert got == ["met", "met", "not met", "not measured", "not measured"]
    assert {t["status"] for t in ts.judge_targets(rows, smoke=True)} == {"not judged: a CPU smoke run"}


def test_a_method_is_measured_through_its_spec_alone(ts):
    """MAE has no branch in the benchmark: its StepBench gives its flags, row fields, FLOP count and
    (no) peer, and its training FLOPs are its MethodSpec's."""
    from ldae_fast.config import build_config
    from ldae_fast.methods import METHODS

    rows, meta = ts.run(["--method", "mae", "--cpu-smoke", "--compile-backend", "eager", "--variants", "a,c",
                         "--mask-ratio", "0.5", "--warmup", "0", "--steps", "1", "--no-write"])
    a, c = rows
    assert a["status"] == "ok" and a["model"] == "MAE tiny" and a["method"] == "mae" and a["mask_ratio"] == 0.5
    cfg = build_config("demo", {"objective.method": "mae", "mae.mask_ratio": "0.5"})
    assert a["train_flops_per_image"] == METHODS["mae"].train_flops(cfg)[1]
    assert c["status"].startswith("n/a: no timm peer") and c["images_per_s"] is None
    assert meta["mask_ratio"] == 0.5 and "mae.model.train_flops_per_image" in meta["flop_count"]
    assert "targets" not in meta
    # a flag of another method is refused; the method's own flags take its defaults
    with pytest.raises(SystemExit):
        ts.parse_args(["--method", "mae", "--layout", "dit"])
    args = ts.parse_args(["--method", "mae"])
    assert args.mask_ratio == 0.75 and args.layout is None and args.decoder_kind is None
