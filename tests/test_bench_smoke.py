"""bench/kernels.py runs end to end in its CPU-smoke mode and reports every variant of every op."""

import pytest
from bench_import import load_bench


def test_kernels_bench_cpu_smoke(tmp_path, capsys):
    from ldae_fast.kernels import triton_available

    if not triton_available("cpu"):
        pytest.skip("the kernels were defined for the GPU in this process (TRITON_INTERPRET unset); "
                    "the CPU smoke runs in the default `make test`")
    bench = load_bench("kernels")
    # aot_eager keeps the compiled baseline's code path without paying for C++ builds here;
    # `python bench/kernels.py --cpu-smoke` uses inductor.
    rows = bench.main(["--cpu-smoke", "--compile-backend", "aot_eager", "--write",
                       "--out-dir", str(tmp_path), "--profile", str(tmp_path / "prof"), "--profile-calls", "1"])
    got = {(r["op"], r["variant"]) for r in rows}
    assert got == {(o, v) for o in bench.OPS for v in bench.VARIANTS}
    for r in rows:
        assert r["ms"] > 0 and r["bytes"] > 0 and r["GBps"] > 0 and r["frac_copy"] > 0
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_compiled"] > 0 and r["status"] == "ok"
    out = capsys.readouterr().out
    assert "reproduce: " in out and "--cpu-smoke" in out
    assert len(list(tmp_path.glob("kernels-*.json"))) == 1
    md = (tmp_path / "kernels.md").read_text()
    assert md.count("| loss_fwdbwd | triton |") == 1
    # --profile: a trace and a top-ops table per (case, variant).
    tables = sorted((tmp_path / "prof").glob("*/profile_top_kernels.md"))
    assert len(tables) == len(rows)
    assert {t.parent.name.rsplit("_", 1)[1] for t in tables} == set(bench.VARIANTS)
    assert all(list(t.parent.glob("trace_step*.json")) for t in tables)


def test_results_io_roundtrip(tmp_path):
    import json

    write_result = load_bench("results_io").write_result

    jp, mp = write_result("unit", [{"a": 1, "b": 2.5}, {"a": 2, "c": "x|y"}], {"note": "hi"}, out_dir=tmp_path)
    data = json.loads(jp.read_text())
    assert data["name"] == "unit" and data["meta"]["note"] == "hi" and len(data["rows"]) == 2
    for k in ("date", "command", "torch", "triton", "gpu"):
        assert k in data["meta"]
    write_result("unit", [{"a": 3}], out_dir=tmp_path)
    md = mp.read_text()
    assert md.count("| a | b | c |") == 1 and md.count("## ") == 2 and "x\\|y" in md


def test_failing_variant_is_a_row_and_the_others_stand():
    from types import SimpleNamespace

    import torch

    bench = load_bench("kernels")

    def factory():
        def boom():
            raise RuntimeError("adaln_layernorm: no launch configuration fits this GPU")
        return ({"eager": lambda: torch.ones(8).sum(), "compiled": boom, "triton": lambda: torch.ones(8).sum()},
                bench.Traffic(64, "2 token passes", 2))

    rows = bench.measure_case("adaln_ln_fwd", "fp32", 2, {"T": 3, "C": 8}, "T3 C8", factory,
                              bench.Timer(False, 1, 1), 1.0, False, SimpleNamespace(profile=None))
    by = {r["variant"]: r for r in rows}
    assert by["compiled"]["status"].startswith("failed: RuntimeError: adaln_layernorm: no launch")
    assert by["compiled"]["ms"] is None
    assert by["triton"]["status"] == "ok" and by["triton"]["ms"] > 0
    assert by["triton"]["bytes"] == 64 and by["triton"]["passes"] == "2 token passes" and by["triton"]["min_passes"] == 2
    assert by["triton"]["speedup_vs_eager"] > 0 and by["triton"]["speedup_vs_compiled"] is None


def test_kernel_bytes_are_what_each_kernel_moves():
    """The loss forward + backward counts the 5 image passes its kernels make plus the projection
    written and read (not the 3 an op needs at least), the adaLN forward + backward 5 token passes
    in their own dtypes (y and dy in the output dtype) plus mean / rstd, and each row says so."""
    import torch

    bench = load_bench("kernels")
    cpu = torch.device("cpu")
    B, S, p, d = 2, 32, 4, 16
    img = B * 3 * S * S * 4
    small = d * 3 * p * p * 4 + 3 * p * p * 4 + 2 * B * 4
    _, t = bench.make_variants("loss_fwdbwd", B, S, S, p, d, torch.float32, cpu, None)
    N = (S // p) ** 2
    assert t.bytes == 5 * img + 2 * B * N * d * 4 + small and t.passes.startswith("5 image passes") and t.min_passes == 3
    _, t = bench.make_variants("noise", B, S, S, p, d, torch.bfloat16, cpu, None)
    assert t.bytes == 2 * img // 2 + small and t.min_passes == 2

    B, T, C = 2, 9, 48
    dt = bench.adaln_dtypes("fp32+bf16>bf16")
    assert dt == (torch.float32, torch.bfloat16, torch.bfloat16)
    fns, t = bench.make_adaln_variants("adaln_ln_fwdbwd", B, T, C, dt, cpu, None)
    x4, y2, stats, mod = B * T * C * 4, B * T * C * 2, 8 * B * T, 2 * B * C * 2
    assert t.bytes == 3 * x4 + 2 * y2 + 2 * stats + 2 * mod and t.passes.startswith("5 token passes")
    assert fns["eager"]()[0].dtype == torch.float32  # dx in x's dtype; y was bf16
