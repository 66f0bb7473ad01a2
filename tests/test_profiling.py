import json
import os
from types import SimpleNamespace

import pytest
import torch

from ldae_fast import markers
from ldae_fast.config import Config, DataConfig, EngineConfig, ModelConfig, TokenizerConfig
from ldae_fast.engine.profiling import TOP_KERNELS_FILE, StepProfiler, nvtx_range, top_kernels_table
from ldae_fast.methods.ldae.method import LDAEMethod
from ldae_fast.methods.ldae.model import build_model
from ldae_fast.tokenizers import PixelTokenizer

TINY = dict(size="tiny", width=32, num_heads=2, encoder_depth=1, decoder_depth=1, patch_size=4)


def _forbid_nvtx(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("NVTX called without CUDA")

    monkeypatch.setattr(torch.cuda.nvtx, "range_push", boom)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", boom)


def test_nvtx_range_is_noop_without_cuda(monkeypatch):
    monkeypatch.setattr(markers, "_cuda_present", lambda: False)
    _forbid_nvtx(monkeypatch)
    ran = []
    with nvtx_range("noise"):
        ran.append(1)
    assert ran == [1]
    with pytest.raises(KeyError), nvtx_range("loss"):
        raise KeyError("propagates")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the real detection on a CPU-only machine")
def test_nvtx_range_real_detection_cpu(monkeypatch):
    _forbid_nvtx(monkeypatch)
    with nvtx_range("encoder"):
        pass


def test_nvtx_range_calls_nvtx_when_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(markers, "_cuda_present", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    with pytest.raises(RuntimeError), nvtx_range("backward"):
        raise RuntimeError("x")
    assert calls == [("push", "backward"), ("pop",)]


def test_disabled_profiler_is_inert(tmp_path):
    p = StepProfiler(tmp_path / "prof", steps=0)
    assert not p.active
    p.step()
    p.close()
    assert not (tmp_path / "prof").exists()
    assert p.table is None


def test_from_config_defaults_out_dir(tmp_path):
    p = StepProfiler.from_config(SimpleNamespace(steps=0, out_dir=""), tmp_path / "run" / "profile")
    assert p.out_dir == tmp_path / "run" / "profile" and not p.active
    p = StepProfiler.from_config(SimpleNamespace(steps=0, out_dir=str(tmp_path / "x")), tmp_path / "y")
    assert p.out_dir == tmp_path / "x"


def _tiny_step():
    cfg = Config(model=ModelConfig(**TINY), tokenizer=TokenizerConfig(kind="pixel", latent_dim=48),
                 data=DataConfig(img_size=16, batch_size=4), engine=EngineConfig(kernels="reference", steps=1))
    model = build_model(cfg.model, cfg.ldae, 16)
    obj = LDAEMethod(cfg, "cpu", tokenizer=PixelTokenizer.create(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 3, 16, 16)

    def step(i):
        with nvtx_range("noise"):
            nb = obj.add_noise(x, i)
        with nvtx_range("encoder"):
            tokens = model.encoder(nb.x_in, nb.sigma)
        with nvtx_range("decoder"):
            pred = model.decoder(tokens, nb.sigma)
        with nvtx_range("loss"):
            loss = obj.loss(pred, x, nb.lam)
        with nvtx_range("backward"):
            loss.backward()
        with nvtx_range("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def test_step_profiler_writes_trace_and_table(tmp_path, capsys):
    step = _tiny_step()
    prof = StepProfiler(tmp_path / "prof", steps=2, wait=1, warmup=1)
    assert prof.active and prof.total_steps == 4
    for i in range(6):  # two more than the window: step() must then do nothing
        step(i)
        prof.step()
        assert prof.active == (i < 3)
    assert prof.trace_path is not None and prof.trace_path.exists()
    trace = json.loads(prof.trace_path.read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    # The phase ranges reach the trace through record_function while the profiler collects.
    assert {"noise", "encoder", "decoder", "loss", "optimizer"} <= names
    table_file = tmp_path / "prof" / TOP_KERNELS_FILE
    assert table_file.exists()
    rows = [ln for ln in prof.table.splitlines() if ln.startswith("| ") and not ln.startswith("| #")]
    assert len(rows) >= 5
    assert "CPU self time" in prof.table and "2 step(s)" in prof.table
    assert prof.table in table_file.read_text()
    assert "aten::" in capsys.readouterr().out
    # Outside the profiled window the phase ranges cost nothing again.
    assert not markers.profiling_active()


def test_top_kernels_table_shares_and_limit():
    step = _tiny_step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        for i in range(2):
            step(i)
            p.step()
    text = top_kernels_table(p, n=3)
    body = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| #")]
    assert len(body) == 3
    shares = [float(ln.rstrip(" |").rsplit("|", 1)[1].strip().rstrip("%")) for ln in body]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.0 + 1e-6


def _gpu_profile(flagged: bool):
    """Averaged events as kineto gives them for 2 steps on a GPU: host ops whose self device time
    is their kernels', the kernels themselves, and the projections of host ranges onto the GPU
    timeline (flagged is_user_annotation on newer torch, only named like the range on older)."""
    from torch.autograd import DeviceType

    def ev(key, device, t, count=1, scope=0, annotation=False, cpu=0.0):
        e = SimpleNamespace(key=key, count=count, scope=scope, cpu_time_total=cpu,
                            self_cpu_time_total=cpu, device_time_total=t if device else 0.0,
                            self_device_time_total=t,
                            device_type=DeviceType.CUDA if device else DeviceType.CPU)
        if flagged:
            e.is_user_annotation = annotation
        return e

    return SimpleNamespace(key_averages=lambda: [
        ev("ProfilerStep*", False, 0.0, count=2, scope=7, cpu=3_000.0),
        ev("ProfilerStep*", True, 10_000.0, count=2, annotation=True),
        ev("encoder", False, 0.0, count=2, scope=7, cpu=400.0),
        ev("encoder", True, 4_000.0, count=2, annotation=True),
        ev("backward", False, 0.0, count=2, scope=7, cpu=900.0),
        ev("backward", True, 5_000.0, count=2, annotation=True),
        ev("aten::mm", False, 6_000.0, count=40, cpu=500.0),  # host op: its kernels' time
        ev("sm90_xmma_gemm_bf16", True, 6_000.0, count=40),
        ev("triton_per_fused_add_0", False, 0.0, count=10, cpu=50.0),  # inductor's host range
        ev("triton_per_fused_add_0", True, 1_500.0, count=10),
        ev("_latent_noise_kernel", True, 500.0, count=2),
    ])


@pytest.mark.parametrize("flagged", [True, False], ids=["is_user_annotation", "named-like-range"])
def test_top_kernels_table_on_gpu_lists_kernels_against_the_gpu_step_span(flagged):
    text = top_kernels_table(_gpu_profile(flagged), n=10)
    body = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| #")]
    names = [ln.split("`")[1] for ln in body]
    # Kernels only: no host op counted again, no range, and inductor's kernels kept although a
    # host range bears their name.
    assert names == ["sm90_xmma_gemm_bf16", "triton_per_fused_add_0", "_latent_noise_kernel"]
    assert "device (GPU) self time" in text and "GPU span of the profiled steps" in text
    assert "(2 step(s), 10.00 ms)" in text
    assert "| 60.0% |" in body[0]  # 6 ms of kernels in a 10 ms GPU span, not of 3 ms host time
    assert "all recorded kernels 80.0%" in text


def test_completed_window_header_counts_its_steps(tmp_path):
    step = _tiny_step()
    prof = StepProfiler(tmp_path / "p", steps=2, wait=1, warmup=1, verbose=False)
    for i in range(prof.total_steps):
        step(i)
        prof.step()
    assert not prof.active and prof.recorded == 2
    assert "steps recorded: 2 (after 1 skipped, 1 warm-up)" in prof.table_path.read_text()
    assert "(2 step(s)," in prof.table


def test_a_profile_that_cannot_be_written_does_not_stop_training(tmp_path, monkeypatch, capsys):
    step = _tiny_step()
    prof = StepProfiler(tmp_path / "p", steps=1, wait=0, warmup=1, verbose=False)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", full_disk)
    for i in range(prof.total_steps):
        step(i)
        prof.step()
    assert not prof.active and not markers.profiling_active()
    assert "could not write the profile" in capsys.readouterr().out


def test_close_early_flushes(tmp_path):
    step = _tiny_step()
    prof = StepProfiler(tmp_path / "p", steps=5, wait=0, warmup=1, verbose=False)
    for i in range(2):
        step(i)
        prof.step()
    prof.close()
    prof.close()
    assert not prof.active and not markers.profiling_active()
    assert prof.recorded == 1 and "steps recorded: 1 " in prof.table_path.read_text()
    assert prof.trace_path is not None and prof.trace_path.exists()
    # The same trace in TensorBoard's layout, without a second export.
    (tb,) = (tmp_path / "p" / "tb").glob("*.pt.trace.json")
    assert os.path.samefile(tb, prof.trace_path) or tb.read_bytes() == prof.trace_path.read_bytes()


def test_window_closed_before_recording_writes_nothing(tmp_path):
    step = _tiny_step()
    prof = StepProfiler(tmp_path / "p", steps=3, wait=1, warmup=1, verbose=False)
    step(0)
    prof.step()
    step(1)
    prof.step()  # the warm-up step: nothing recorded yet
    prof.close()
    assert prof.recorded == 0 and prof.trace_path is None and prof.table is None
    assert not list((tmp_path / "p").rglob("*.json")) and not markers.profiling_active()


def test_window_fits_the_steps_left(tmp_path):
    from ldae_fast.engine.profiling import fit_window

    assert fit_window(1, 1, 3, 10) == (1, 1, 3)
    assert fit_window(1, 1, 3, 4) == (0, 1, 3)
    assert fit_window(1, 1, 3, 3) == (0, 0, 3)
    assert fit_window(1, 1, 3, 2) == (0, 0, 2)
    assert fit_window(1, 1, 3, 0) == (0, 0, 0)
    said = []
    cfg = SimpleNamespace(steps=3, out_dir="")
    prof = StepProfiler.from_config(cfg, tmp_path / "a", available=2, log=said.append, verbose=False)
    assert (prof.wait, prof.warmup, prof.steps) == (0, 0, 2) and "becomes 0 + 0 + 2" in said[0]
    assert "start-up costs" in said[0]
    prof.close()
    prof = StepProfiler.from_config(cfg, tmp_path / "b", available=0, log=said.append)
    assert not prof.active and "nothing to profile" in said[-1]
    prof = StepProfiler.from_config(cfg, tmp_path / "c", available=9, log=said.append, verbose=False)
    assert (prof.wait, prof.warmup, prof.steps) == (1, 1, 3) and len(said) == 2
    prof.close()


def test_phase_markers_do_not_break_a_compiled_graph(monkeypatch):
    """Variant (b) of bench/train_step.py compiles the whole model: the encoder/decoder markers
    must vanish from the graph (no break, no NVTX calls from compiled code), even with CUDA."""
    monkeypatch.setattr(markers, "_cuda_present", lambda: True)
    _forbid_nvtx(monkeypatch)
    torch._dynamo.reset()
    from ldae_fast.methods.ldae.config import LDAEConfig

    model = build_model(ModelConfig(**TINY), LDAEConfig(), 16).eval()
    x, sigma = torch.randn(2, 3, 16, 16), torch.rand(2)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, sigma), model.decoder(model.encoder(x, sigma), sigma))
    torch._dynamo.reset()
