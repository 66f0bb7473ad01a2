"""Preemption: a signal or engine.stop_after ends the run at a step boundary with a checkpoint and
exit code 10, and `--resume auto` continues it bit-identically (weights, EMA and loss curve)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldae_fast.config import ConfigError, build_config, parse_duration
from ldae_fast.engine import checkpoint as ck
from ldae_fast.engine.loop import train
from ldae_fast.engine.preempt import MARKER, PREEMPTED_EXIT, Preempted
from ldae_fast.errors import EXIT_CODES
from ldae_fast.methods.ldae import method as ldae_obj

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
    "data.img_size": "16", "data.batch_size": "8", "data.synthetic_images": "64", "tokenizer.fit_images": "32",
    "engine.kernels": "reference", "engine.log_every": "3", "engine.progress": "false", "optim.blr": "1e-3",
    "optim.warmup_epochs": "0.5", "eval.probe": "false", "eval.figure": "false", "optim.ema_decay": "0.9",
    "engine.deterministic": "true",
}


def _cfg(out: Path, **over):
    return build_config("demo", {**TINY, "engine.out_dir": str(out), **{k: str(v) for k, v in over.items()}})


def _curve(out: Path) -> dict[int, float]:
    """step -> loss; a resumed run appends, and its later lines win."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _same_final_state(a_dir: Path, b_dir: Path, steps: int) -> None:
    a, b = (ck.load_state(ck.latest_checkpoint(d)) for d in (a_dir, b_dir))
    assert a["step"] == b["step"] == steps
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)


def test_duration_parsing_and_config_check():
    assert parse_duration("3h50m") == 13800 and parse_duration("90") == 90 and parse_duration("") == 0
    assert parse_duration("1d2h") == 93600 and parse_duration("2.5m") == 150
    for bad in ("3x", "h", "-1", "inf", "3h-5m"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ConfigError, match="engine.stop_after"):
        build_config("demo", {"engine.stop_after": "soon"})
    assert EXIT_CODES["preempted"] == PREEMPTED_EXIT == Preempted.exit_code != 0


def _signal_at(monkeypatch, at_step: int, signals: tuple) -> None:
    """Deliver `signals` to this process during the forward pass of step `at_step`."""
    real = ldae_obj.LDAEMethod.__call__

    def call(self, model, batch, step, *a, **kw):
        if step == at_step and micro_first(a, kw):
            for s in signals:
                os.kill(os.getpid(), s)
        return real(self, model, batch, step, *a, **kw)

    def micro_first(a, kw):
        return (a[0] if a else kw.get("micro", 0)) == 0

    monkeypatch.setattr(ldae_obj.LDAEMethod, "__call__", call)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, monkeypatch, sig):
    over = {"engine.steps": 8, "engine.grad_accum": 2, "data.batch_size": 4}
    train(_cfg(tmp_path / "a", **over))
    _signal_at(monkeypatch, 4, (sig,))  # mid-step 4 (0-based): steps 0..4 finish, then the checkpoint
    with pytest.raises(Preempted, match=f"stopped at step 5 of 8 \\({signal.Signals(sig).name} received"):
        train(_cfg(tmp_path / "b", **over))
    assert ck.latest_checkpoint(tmp_path / "b").name == "step_00000005"
    assert json.loads((tmp_path / "b" / MARKER).read_text())["step"] == 5
    # The handlers are the previous ones again once train() returns.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    train(_cfg(tmp_path / "b", **over, **{"engine.resume": "auto"}))
    assert not (tmp_path / "b" / MARKER).exists()
    _same_final_state(tmp_path / "a", tmp_path / "b", 8)
    # Step 6's log line averages steps 4..6, across the preemption: the same number.
    assert _curve(tmp_path / "a") == _curve(tmp_path / "b")


def test_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch):
    _signal_at(monkeypatch, 2, (signal.SIGINT, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, **{"engine.steps": 8}))
    assert ck.latest_checkpoint(tmp_path) is None


def test_signal_on_the_last_step_ends_the_run_normally(tmp_path, monkeypatch):
    _signal_at(monkeypatch, 3, (signal.SIGTERM,))
    res = train(_cfg(tmp_path, **{"engine.steps": 4}))
    assert res.steps == 4 and res.checkpoint.name == "step_00000004"


def test_stop_after_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    over = {"engine.steps": 6}
    train(_cfg(tmp_path / "a", **over))
    clock = {"t": 1000.0}
    # A fake clock that advances 10 s per step: with stop_after=35s the run ends at the last step
    # expected to finish before the limit, wherever the real machine's speed puts it.
    monkeypatch.setattr("ldae_fast.engine.preempt.time.time", lambda: clock["t"])
    real = ldae_obj.LDAEMethod.__call__

    def call(self, *a, **kw):
        clock["t"] += 10.0
        return real(self, *a, **kw)

    monkeypatch.setattr(ldae_obj.LDAEMethod, "__call__", call)
    with pytest.raises(Preempted, match="engine.stop_after=35s reached") as e:
        train(_cfg(tmp_path / "b", **over, **{"engine.stop_after": "35s"}))
    # Steps end at t0+10, +20, +30: a 4th would end at +40 > +35, so the run stops after 3.
    assert "stopped at step 3 of 6" in str(e.value)
    monkeypatch.undo()
    train(_cfg(tmp_path / "b", **over, **{"engine.resume": "auto"}))
    _same_final_state(tmp_path / "a", tmp_path / "b", 6)
    assert _curve(tmp_path / "a") == _curve(tmp_path / "b")


@pytest.mark.slow
def test_sigterm_at_a_random_moment_then_resume_matches_uninterrupted(tmp_path):
    """A real process gets SIGTERM at a seeded random moment of its training (maybe mid-step, maybe
    mid-checkpoint); it must exit 10 with a checkpoint, and the resumed run must end with exactly
    the weights, EMA and loss curve of a run that was never interrupted."""
    rnd = random.Random(23)
    args = [f"--{k}={v}" for k, v in TINY.items()] + [
        "--engine.steps=40", "--engine.ckpt_every=7", "--engine.keep_last=2", "--data.num_workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("LDAE_DEBUG", None)

    def run(out, extra=()):
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"--engine.out_dir={out}", *extra],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    ref = run(tmp_path / "a")
    victim = run(tmp_path / "b")
    deadline = time.time() + 300  # guards a hang only

    def wait_for_step(n: int) -> float:
        while not (tmp_path / "b" / "metrics.jsonl").exists() or max(_curve(tmp_path / "b"), default=0) < n:
            assert victim.poll() is None, victim.stderr.read()[-2000:]
            assert time.time() < deadline, f"the run never reached step {n}"
            time.sleep(0.01)
        return time.time()

    # A random moment between steps 6 and ~26 of 40, measured in this machine's step time.
    t3 = wait_for_step(3)
    per_step = (wait_for_step(6) - t3) / 3
    time.sleep(rnd.uniform(0.0, 20 * per_step))
    victim.send_signal(signal.SIGTERM)
    code = victim.wait(timeout=300)
    err = victim.stderr.read()
    assert code == PREEMPTED_EXIT, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: preempted: stopped at step") and "SIGTERM received" in last, last
    stopped = int(last.split("stopped at step ")[1].split()[0])
    assert ck.latest_checkpoint(tmp_path / "b").name == f"step_{stopped:08d}"
    resumed = run(tmp_path / "b", ["--engine.resume=auto"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    _same_final_state(tmp_path / "a", tmp_path / "b", 40)
    assert _curve(tmp_path / "a") == _curve(tmp_path / "b")
