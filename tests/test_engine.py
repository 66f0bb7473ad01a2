import json
import math

import pytest
import torch
from conftest import TINY_DEMO as TINY
from conftest import demo_cfg

from ldae_fast.batch import Batch
from ldae_fast.config import build_config
from ldae_fast.engine import checkpoint as ck
from ldae_fast.engine.loop import NonFiniteLoss, train
from ldae_fast.engine.optim import EMA
from ldae_fast.methods.ldae import method as ldae_obj


def _cfg(tmp_path, **over):
    return demo_cfg(tmp_path / "run", **over)


def test_ema_tracks_parameters():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, 0.5)
    ema.updates = 1000  # past the warm-up: decay 0.5
    before = ema.state_dict()["weight"].clone()
    with torch.no_grad():
        m.weight.add_(2.0)
    ema.update(m)
    torch.testing.assert_close(ema.state_dict()["weight"], before + 1.0)


def test_ema_batched_update_matches_per_tensor_rule():
    """Parameters are averaged (one multi-tensor lerp), buffers copied, ints included."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    ema = EMA(m, 0.9)
    want = {k: v.clone() for k, v in ema.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        m.train()(torch.randn(5, 3))  # moves the BatchNorm running stats and its int counter
        d = ema.current_decay()
        params = dict(m.named_parameters())
        for k, v in m.state_dict().items():
            want[k] = d * want[k] + (1 - d) * v.float() if k in params else v.clone().to(want[k].dtype)
        ema.update(m)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-6)
    assert ema.state_dict()["1.num_batches_tracked"].item() == 3


def test_fixed_batch_loss_goes_down():
    from ldae_fast.methods.ldae.model import build_model
    from ldae_fast.tokenizers import fit_pca

    cfg = build_config("demo", {**TINY})
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    tok = fit_pca(iter([x]), 4, cfg.tokenizer.latent_dim, 8)
    obj = ldae_obj.LDAEMethod(cfg, "cpu", tokenizer=tok)
    model = build_model(cfg.model, cfg.ldae, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(60):
        loss = obj(model, Batch(x), step % 4)  # four fixed noise draws
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses[::10]


def test_run_writes_config_metrics_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, **{"engine.steps": 4})
    res = train(cfg)
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["model"]["width"] == 32
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in lines)
    # Achieved model TFLOP/s from the analytic count; no MFU without a known peak (CPU).
    from ldae_fast.methods.ldae.flops import train_flops_per_image

    per_image = train_flops_per_image(cfg.model, cfg.ldae, cfg.data.img_size)[1]
    for r in lines:
        # images_per_s is logged to 0.1: the bounds allow that rounding (and tflops' 4 digits).
        lo, hi = ((r["images_per_s"] + d) * per_image / 1e12 for d in (-0.05, 0.05))
        assert lo * (1 - 1e-3) <= r["tflops"] <= hi * (1 + 1e-3) and "mfu" not in r
    assert res.checkpoint == ck.latest_checkpoint(out) and res.checkpoint.name == "step_00000004"
    assert (out / "tokenizer.safetensors").exists()


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_after_crash_matches_uninterrupted(tmp_path, monkeypatch):
    over = {"engine.steps": 8, "engine.ckpt_every": 3, "engine.deterministic": "true"}
    ref = train(_cfg(tmp_path / "a", **over))

    real_call = ldae_obj.LDAEMethod.__call__

    def crashing(self, model, batch, step, *a, **kw):
        if step == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_call(self, model, batch, step, *a, **kw)

    monkeypatch.setattr(ldae_obj.LDAEMethod, "__call__", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "b", **over))
    assert ck.latest_checkpoint(tmp_path / "b" / "run").name == "step_00000003"
    monkeypatch.setattr(ldae_obj.LDAEMethod, "__call__", real_call)
    res = train(_cfg(tmp_path / "b", **over, **{"engine.resume": "auto"}))
    a, b = _params(ref.model), _params(res.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, v in ref.ema.state_dict().items():
        assert torch.equal(v, res.ema.state_dict()[k]), k


def test_resume_refuses_another_batch_split(tmp_path):
    from ldae_fast.engine.loop import ResumeMismatch

    train(_cfg(tmp_path, **{"engine.steps": 4}))
    written = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    # Another global batch; (4, accumulation 2) keeps it and resumes (tests/test_reshape.py).
    for over, said in (({"data.batch_size": 4}, "data.batch_size 8 -> 4"),
                       ({"data.batch_size": 2, "engine.grad_accum": 2}, "engine.grad_accum 1 -> 2")):
        with pytest.raises(ResumeMismatch, match=said):
            train(_cfg(tmp_path, **{"engine.steps": 6, "engine.resume": "auto", **over}))
    # Refused before touching the run: config.json, metrics and checkpoints as they were.
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == written
    assert ck.latest_checkpoint(tmp_path / "run").name == "step_00000004"
    res = train(_cfg(tmp_path, **{"engine.steps": 6, "engine.resume": "auto"}))
    assert res.checkpoint.name == "step_00000006"


def test_loop_passes_each_micro_batch_its_rows(tmp_path, monkeypatch):
    """With accumulation the loop hands the objective the optimizer step and the micro-batch's
    place, so the noise rows follow the global batch (test_objective checks the rows)."""
    seen = []
    real = ldae_obj.LDAEMethod.add_noise

    def spy(self, x, step, t=None, micro=0, accum=1):
        seen.append((step, micro, accum))
        return real(self, x, step, t, micro=micro, accum=accum)

    monkeypatch.setattr(ldae_obj.LDAEMethod, "add_noise", spy)
    train(_cfg(tmp_path, **{"engine.steps": 2, "data.batch_size": 4, "engine.grad_accum": 2}))
    assert seen == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]


def test_sharded_only_deepspeed_state_resumes_on_its_own_rank_count_and_says_so_elsewhere(tmp_path):
    from ldae_fast.config import build_config as bc
    from ldae_fast.engine.loop import ResumeMismatch, check_resume_fits

    cfg = bc("demo", {"engine.backend": "deepspeed", "data.batch_size": "8"})
    state = {"world_size": 2, "config": cfg.to_dict()}  # no whole model / optimizer: ckpt_consolidated=false
    check_resume_fits(state, tmp_path, cfg, world=2)
    with pytest.raises(ResumeMismatch, match="sharded over 2 ranks.*zero_stage 2 on 2 ranks"):
        check_resume_fits(state, tmp_path, cfg, world=1)
    # With the consolidated state beside the shards, the same move is a reshape (global batch kept).
    whole = {**state, "model": {}, "optimizer": {}}
    plan = check_resume_fits(whole, tmp_path, bc("demo", {"engine.backend": "deepspeed", "data.batch_size": "16"}),
                             world=1)
    assert plan is not None
    check_resume_fits({"step": 3}, tmp_path, cfg, world=1)  # nothing recorded: nothing to compare


def test_half_written_checkpoint_is_skipped(tmp_path):
    cfg = _cfg(tmp_path, **{"engine.steps": 2})
    train(cfg)
    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000099").mkdir()  # no meta.json: a write cut short
    (root / "step_00000099" / "state.pt").write_bytes(b"\x00" * 10)
    assert ck.latest_checkpoint(tmp_path / "run").name == "step_00000002"
    assert ck.resolve_resume("auto", tmp_path / "run").name == "step_00000002"


def test_keep_last_prunes(tmp_path):
    cfg = _cfg(tmp_path, **{"engine.steps": 6, "engine.ckpt_every": 1, "engine.keep_last": 2})
    train(cfg)
    names = [p.name for p in ck.list_checkpoints(tmp_path / "run")]
    assert names == ["step_00000005", "step_00000006"]


def test_non_finite_loss_stops_with_step(tmp_path, monkeypatch):
    real_call = ldae_obj.LDAEMethod.__call__

    def poisoned(self, model, batch, step, *a, **kw):
        loss = real_call(self, model, batch, step, *a, **kw)
        return loss * float("nan") if step == 2 else loss

    monkeypatch.setattr(ldae_obj.LDAEMethod, "__call__", poisoned)
    with pytest.raises(NonFiniteLoss, match="non-finite at step 3"):
        train(_cfg(tmp_path, **{"engine.steps": 6}))
    assert ck.latest_checkpoint(tmp_path / "run") is None


def test_mfu_logged_against_the_given_peak(tmp_path):
    train(_cfg(tmp_path, **{"engine.steps": 2, "engine.peak_tflops": 1e-6}))
    (rec,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec["mfu"] == pytest.approx(rec["tflops"] / 1e-6, rel=1e-3)


def test_ema_warms_up():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, 0.9999)
    assert ema.current_decay() == pytest.approx(0.1)
    for _ in range(100):
        ema.update(m)
    assert ema.current_decay() == pytest.approx(101 / 110)


def test_profile_steps_write_trace(tmp_path):
    cfg = _cfg(tmp_path, **{"engine.steps": 4, "profile.steps": 1})
    train(cfg)
    prof_dir = tmp_path / "run" / "profile"
    assert (prof_dir / "profile_top_kernels.md").read_text().strip()
    assert any(p.suffix == ".json" or p.name.endswith(".json.gz") for p in prof_dir.rglob("*"))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    """A real crash: the process is SIGKILLed mid-training (possibly mid-checkpoint), then
    `--resume auto` must end with exactly the parameters of a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    args = [f"--{k}={v}" for k, v in TINY.items()] + [
        "--engine.steps=40", "--engine.ckpt_every=4", "--engine.keep_last=3",
        "--engine.deterministic=true", "--optim.ema_decay=0.9"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}

    def run(out, extra=()):
        return subprocess.Popen([sys.executable, str(root / "train.py"), *args, f"--engine.out_dir={out}", *extra],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    ref = run(tmp_path / "a")
    victim = run(tmp_path / "b")
    deadline = time.time() + 120
    while ck.latest_checkpoint(tmp_path / "b") is None or \
            int(ck.latest_checkpoint(tmp_path / "b").name.split("_")[1]) < 12:
        assert victim.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert ck.latest_checkpoint(tmp_path / "b").name != "step_00000040"
    resumed = run(tmp_path / "b", ["--engine.resume=auto"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    a = ck.load_state(ck.latest_checkpoint(tmp_path / "a"))
    b = ck.load_state(ck.latest_checkpoint(tmp_path / "b"))
    assert a["step"] == b["step"] == 40
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)


class _ReadBackCounter:
    """Counts host read-backs of tensor values (.item(), bool(), float(), int(), .tolist()) made
    while `active`; on CUDA each one would stall the host until the GPU catches up."""

    METHODS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")

    def __init__(self, monkeypatch):
        self.active = False
        self.calls: list[str] = []
        for name in self.METHODS:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, _name=name, **k):
                if self.active:
                    self.calls.append(_name)
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)

    def watch(self, fn, active: bool = True):
        """fn, counting read-backs inside it (active=False: not counting, even when nested)."""
        def run(*a, **k):
            outer, self.active = self.active, active
            try:
                return fn(*a, **k)
            finally:
                self.active = outer
        return run


def test_training_step_reads_nothing_back_to_the_host(tmp_path, monkeypatch):
    """Noise, forward, loss, backward, gradient norm and clipping, EMA: device work only, so a GPU
    step never waits on the host. The loss and the non-finite check reach the host at log steps
    only (checked here: they are the only read-backs of the loop's own tensors)."""
    from ldae_fast.engine import loop as loop_mod

    counter = _ReadBackCounter(monkeypatch)
    monkeypatch.setattr(ldae_obj.LDAEMethod, "__call__", counter.watch(ldae_obj.LDAEMethod.__call__))
    monkeypatch.setattr(loop_mod.SingleDevice, "backward", counter.watch(loop_mod.SingleDevice.backward))
    monkeypatch.setattr(loop_mod.SingleDevice, "step", counter.watch(loop_mod.SingleDevice.step))
    monkeypatch.setattr(loop_mod.EMA, "update", counter.watch(loop_mod.EMA.update))
    # torch.optim.AdamW on CPU reads its step counter with .item() (free on CPU); the fused CUDA
    # AdamW the GPU path uses does not. Everything else in SingleDevice.step stays watched.
    monkeypatch.setattr(torch.optim.AdamW, "step", counter.watch(torch.optim.AdamW.step, active=False))
    res = train(_cfg(tmp_path, **{"engine.steps": 4, "engine.log_every": 4, "optim.clip_grad": 1.0,
                                  "optim.ema_decay": 0.99}))
    assert res.steps == 4 and math.isfinite(res.final_loss)
    assert counter.calls == [], f"host read-backs inside the training step: {counter.calls}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs a GPU")
def test_training_step_has_no_cuda_sync(tmp_path, monkeypatch):
    """On a GPU, the same check by CUDA itself: any synchronising call in the step raises."""
    from ldae_fast.engine import loop as loop_mod

    def strict(fn):
        def run(*a, **k):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    for owner, name in ((ldae_obj.LDAEMethod, "__call__"), (loop_mod.SingleDevice, "backward"),
                        (loop_mod.SingleDevice, "step"), (loop_mod.EMA, "update")):
        monkeypatch.setattr(owner, name, strict(getattr(owner, name)))
    res = train(_cfg(tmp_path, **{"engine.steps": 3, "engine.log_every": 3, "engine.device": "cuda",
                                  "engine.kernels": "auto", "optim.clip_grad": 1.0}))
    assert math.isfinite(res.final_loss)


def test_finish_demo_evaluates_an_fp32_copy_of_a_bf16_model(tmp_path):
    """DeepSpeed's bf16 mode leaves bf16 parameters in the trained module; the end-of-run figure
    runs on the CPU in fp32, so it must get an fp32 copy (with or without an EMA)."""
    from ldae_fast.train import finish_demo

    cfg = _cfg(tmp_path, **{"engine.steps": 2, "optim.ema_decay": 0, "eval.figure": "true"})
    res = train(cfg)
    assert res.ema is None
    trained = {k: v.clone() for k, v in res.model.state_dict().items()}
    res.model = res.model.bfloat16()
    out = finish_demo(cfg, res, log=lambda msg: None)
    assert (tmp_path / "run" / "denoising.png").exists() and out["figure"]
    # The trained module itself is left as it was (bf16), not moved or cast back.
    assert all(v.dtype == torch.bfloat16 for k, v in res.model.state_dict().items()
               if trained[k].is_floating_point())


def test_a_launched_rank_binds_its_gpu_before_building_anything(monkeypatch):
    from ldae_fast.engine.loop import bind_local_rank

    bound = []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(RuntimeError, match="LOCAL_RANK=4 but this process sees 4 GPU"):
        bind_local_rank(torch.device("cuda"))
    monkeypatch.setenv("LOCAL_RANK", "3")
    bind_local_rank(torch.device("cuda"))
    bind_local_rank(torch.device("cuda:1"))  # an explicit device is the user's choice
    bind_local_rank(torch.device("cpu"))
    assert bound == [3]
    monkeypatch.delenv("LOCAL_RANK")
    bind_local_rank(torch.device("cuda"))
    assert bound == [3]
