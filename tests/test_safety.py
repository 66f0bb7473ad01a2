"""Safety: nothing a user loads runs code, no good checkpoint is lost, a run owns its directory,
hostile or broken data is counted and named. Tiny models, a few steps, CPU."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_DEMO as TINY
from conftest import demo_cfg as _cfg
from conftest import write_tar as _tar
from PIL import Image

from ldae_fast.config import ConfigError, build_config, parse_cli
from ldae_fast.data.badsamples import BadSampleCounter, DataError
from ldae_fast.data.tar import LabelPolicy, iter_shard, iter_tar
from ldae_fast.data.urls import command_of
from ldae_fast.engine import checkpoint as ck
from ldae_fast.engine import rundir
from ldae_fast.engine.guard import Diverged, DivergenceGuard, NonFiniteLoss
from ldae_fast.engine.loop import train
from ldae_fast.errors import CheckpointError, ResumeMismatch, RunDirError
from ldae_fast.eval.reader import load_for_eval
from ldae_fast.methods.ldae import method as ldae_obj

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run with checkpoints at steps 2 and 4 (copied by tests that damage it)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    train(_cfg(out, **{"engine.steps": 4, "engine.ckpt_every": 2, "engine.keep_last": 3}))
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / rundir.LOCK).unlink(missing_ok=True)
    return dst


def _rehash(d: Path) -> None:
    """What an attacker would do: make meta.json's checksums match the altered files."""
    meta = json.loads((d / "meta.json").read_text())
    meta["files"] = {rel: hashlib.sha256((d / rel).read_bytes()).hexdigest() for rel in meta["files"]}
    (d / "meta.json").write_text(json.dumps(meta))


class _Payload:
    """Unpickling this creates `path`: the marker that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _poison(ckpt: Path, marker: Path, keep_format: bool = True) -> None:
    st = torch.load(ckpt / "state.pt", weights_only=True)
    st["evil"] = _Payload(marker)
    torch.save(st, ckpt / "state.pt")
    _rehash(ckpt)
    if not keep_format:
        meta = json.loads((ckpt / "meta.json").read_text())
        meta.pop("format_version")
        (ckpt / "meta.json").write_text(json.dumps(meta))


# 1. Loading never executes code ----------------------------------------------------------------
def test_checkpoint_state_is_plain_tensors_and_containers(trained):
    d = ck.latest_checkpoint(trained)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["format_version"] == ck.FORMAT_VERSION == 2
    assert meta["files"]["state.pt"] == hashlib.sha256((d / "state.pt").read_bytes()).hexdigest()
    st = torch.load(d / "state.pt", weights_only=True)  # raises on any pickled object
    assert st["step"] == 4 and torch.is_tensor(st["rng"]["numpy"]["keys"])
    assert (ck.ckpt_root(trained) / "latest").read_text().strip() == d.name


@pytest.mark.parametrize("loader", ["resume-auto", "resume-path", "eval", "export"])
@pytest.mark.parametrize("keep_format", [True, False], ids=["format2", "format1"])
def test_pickle_payload_never_runs(trained, tmp_path, loader, keep_format):
    run = _copy_run(trained, tmp_path / "run")
    newest = ck.latest_checkpoint(run)
    for d in ck.list_checkpoints(run):
        _poison(d, tmp_path / "marker", keep_format)
    if loader.startswith("resume"):
        resume = "auto" if loader == "resume-auto" else str(newest)
        with pytest.raises(CheckpointError, match="pickled objects" if keep_format else "format version 1"):
            train(_cfg(run, **{"engine.steps": 6, "engine.resume": resume}))
    elif loader == "eval":
        from ldae_fast.eval.driver import main
        assert main(["--checkpoint", str(newest), "--out", str(tmp_path / "ev"), "--no-baseline"]) == 6
    else:
        from ldae_fast.eval.export import main
        assert main([str(newest), str(tmp_path / "enc.safetensors")]) == 6
    assert not (tmp_path / "marker").exists(), "unpickling the checkpoint ran code"


def test_the_payload_is_live(trained, tmp_path):
    """The poisoned file does run code under a plain unpickler: the tests above prove something."""
    run = _copy_run(trained, tmp_path / "run")
    _poison(ck.latest_checkpoint(run), tmp_path / "marker")
    torch.load(ck.latest_checkpoint(run) / "state.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


def test_loads_inside_deepspeed_are_forced_to_weights_only(tmp_path):
    """DeepSpeed's loader passes weights_only=False itself; our context overrides it."""
    torch.save({"x": torch.ones(2), "evil": _Payload(tmp_path / "marker")}, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="pickled objects"), ck.weights_only_loads():
        torch.load(tmp_path / "f.pt", weights_only=False)
    assert not (tmp_path / "marker").exists()
    torch.save({"x": torch.ones(2)}, tmp_path / "ok.pt")
    with ck.weights_only_loads():
        assert torch.equal(torch.load(tmp_path / "ok.pt", weights_only=False)["x"], torch.ones(2))


def test_old_format_is_refused_naming_the_version(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    d = ck.latest_checkpoint(run)
    meta = json.loads((d / "meta.json").read_text())
    meta.pop("format_version")
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 1"):
        ck.load_state(d)


def _export_with_config(trained, tmp_path, data: dict) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ldae_fast.eval.export import export_encoder

    path = export_encoder(ck.latest_checkpoint(trained), tmp_path / "enc.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    c = json.loads(meta["ldae_config"])
    c["data"].update(data)
    meta["ldae_config"] = json.dumps(c)
    save_file(sd, str(path), metadata=meta)
    return path


# Shard strings that become a command or a remote URL only after `::` splitting, brace expansion
# or normalisation (MARK: a file the command would create). The first three are issue 21's.
ATTACKS = [
    "{pipe:touch MARK,pipe:touch MARK2}",
    "{pipe:,x}touch MARK",
    "{http:,x}//127.0.0.1:9/x.tar",
    " PIPE:touch MARK",
    "Pipe:touch MARK",
    "a.tar::pipe:touch MARK",
    "{a::pipe:touch MARK,b}",
    "{{pipe:,x}touch MARK,y}",
    "{x, pipe:touch MARK}",
    "HTTPS://127.0.0.1:9/x-{0..1}.tar",
    "{s3,x}://bucket/x.tar",
    "pipe:sh -c 'touch MARK'",
]


@pytest.fixture
def no_process(monkeypatch):
    """Fail the test if the shard reader starts any process (a pipe: command or curl)."""
    from ldae_fast.data import urls

    def refuse(argv, *a, **k):
        raise AssertionError(f"the reader started {argv!r}")

    monkeypatch.setattr(urls.subprocess, "Popen", refuse)


def _attack(template: str, tmp_path: Path) -> str:
    return template.replace("MARK2", str(tmp_path / "marker2")).replace("MARK", str(tmp_path / "marker"))


def _nothing_ran(tmp_path: Path) -> bool:
    return not (tmp_path / "marker").exists() and not (tmp_path / "marker2").exists()


def _one_error_line(capsys, prog: str, category: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: {category}: "), err
    return err[0]


@pytest.mark.parametrize("field", ["train_shards", "val_shards"])
def test_pipe_in_an_exported_config_never_runs(trained, tmp_path, field):
    from ldae_fast.eval.driver import main

    marker = tmp_path / "marker"
    path = _export_with_config(trained, tmp_path, {"source": "wds", "epoch_size": 8,
                                                   field: f"pipe:touch {marker}"})
    with pytest.warns(UserWarning, match=f"data.{field}"):
        rc = main(["--checkpoint", str(path), "--out", str(tmp_path / "ev"), "--no-baseline"])
    assert rc == 5 and not marker.exists()  # the blanked shard list is a data error


@pytest.mark.parametrize("template", ATTACKS)
def test_expanded_pipe_in_an_export_never_runs(trained, tmp_path, template, capsys, no_process):
    from ldae_fast.eval.driver import main

    bad = _attack(template, tmp_path)
    path = _export_with_config(trained, tmp_path, {"source": "wds", "epoch_size": 8,
                                                   "train_shards": bad, "val_shards": bad})
    capsys.readouterr()
    with pytest.warns(UserWarning, match="data.train_shards") as got:
        rc = main(["--checkpoint", str(path), "--out", str(tmp_path / "ev"), "--no-baseline"])
    assert any("data.val_shards" in str(w.message) for w in got)
    assert rc == 5 and _nothing_ran(tmp_path)
    assert "is empty" in _one_error_line(capsys, "ldae-fast eval", "data error")


def _checkpoint_with_data(trained, tmp_path, data: dict) -> Path:
    run = _copy_run(trained, tmp_path / "run")
    d = ck.latest_checkpoint(run)
    st = torch.load(d / "state.pt", weights_only=True)
    st["config"]["data"].update(data)
    torch.save(st, d / "state.pt")
    _rehash(d)
    return d


@pytest.mark.parametrize("template", ATTACKS)
def test_expanded_pipe_in_a_checkpoint_config_never_runs(trained, tmp_path, template, capsys, no_process):
    from ldae_fast.eval.driver import main

    bad = _attack(template, tmp_path)
    d = _checkpoint_with_data(trained, tmp_path, {"source": "wds", "epoch_size": 8,
                                                  "train_shards": bad, "val_shards": bad})
    capsys.readouterr()
    with pytest.warns(UserWarning, match="expands to a pipe: command or remote URL"):
        rc = main(["--checkpoint", str(d), "--out", str(tmp_path / "ev"), "--no-baseline"])
    assert rc == 5 and _nothing_ran(tmp_path)
    _one_error_line(capsys, "ldae-fast eval", "data error")


@pytest.mark.parametrize("template", ATTACKS)
def test_expanded_pipe_in_a_config_file_never_runs(tmp_path, template, capsys, no_process):
    from ldae_fast.train import main

    bad = _attack(template, tmp_path)
    cfg = build_config("demo", {"data.source": "wds", "data.epoch_size": "8", "engine.steps": "1",
                                "engine.out_dir": str(tmp_path / "run")})
    cfg.data.train_shards = cfg.data.val_shards = bad
    cfg.save(tmp_path / "c.json")
    capsys.readouterr()
    rc = main(["--config", str(tmp_path / "c.json")])
    assert rc == 2 and _nothing_ran(tmp_path)
    line = _one_error_line(capsys, "train.py", "config error")
    assert "c.json" in line and "data.train_shards" in line
    # Typed on the command line, the same string is the user's choice (not run here: parse only).
    got, _ = parse_cli(["--config", str(tmp_path / "c.json"), f"--data.train_shards={bad}",
                        f"--data.val_shards={bad}"])
    assert got.data.train_shards == bad


@pytest.mark.parametrize("template", ATTACKS[:3])
def test_export_does_not_copy_an_expanded_pipe(trained, tmp_path, template, no_process):
    from safetensors import safe_open

    from ldae_fast.eval.export import main

    bad = _attack(template, tmp_path)
    d = _checkpoint_with_data(trained, tmp_path, {"source": "wds", "epoch_size": 8, "train_shards": bad})
    with pytest.warns(UserWarning, match="data.train_shards"):
        assert main([str(d), str(tmp_path / "exp")]) == 0
    with safe_open(str(tmp_path / "exp" / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ldae_config"])["data"]["train_shards"] == ""
    assert "pipe:" not in meta["ldae_config"].lower() and "http" not in meta["ldae_config"].lower()
    assert _nothing_ran(tmp_path)


def test_remote_url_in_a_checkpoint_config_is_dropped(trained, tmp_path):
    d = _checkpoint_with_data(trained, tmp_path, {"source": "wds", "train_shards": "https://evil.example/x-{0..3}.tar",
                                                  "val_shards": "pipe:sh -c 'touch m'", "epoch_size": 8})
    with pytest.warns(UserWarning, match="not used"):
        cfg, _, _ = load_for_eval(d)
    assert cfg.data.train_shards == "" and cfg.data.val_shards == ""


def test_config_file_with_pipe_needs_the_command_line(tmp_path):
    cfg = build_config("demo", {"data.source": "wds", "data.epoch_size": "8",
                                "data.train_shards": "pipe:cat x.tar"})
    cfg.save(tmp_path / "c.json")
    with pytest.raises(ConfigError, match=r"c\.json.*data\.train_shards"):
        parse_cli(["--config", str(tmp_path / "c.json")])
    got, _ = parse_cli(["--config", str(tmp_path / "c.json"), "--data.train_shards=pipe:cat y.tar"])
    assert got.data.train_shards == "pipe:cat y.tar"


def test_remote_urls_run_without_a_shell(tmp_path):
    marker = tmp_path / "marker"
    url = f"https://127.0.0.1:9/a'$(touch {marker})'.tar"
    assert command_of(url) == ["curl", "-fsSL", "--", url]
    counter = BadSampleCounter(1.0)
    assert list(iter_shard(url, counter)) == [] and counter.bad == 1  # no network: a broken shard
    # A pipe: URL is one command and its arguments: `;` is an argument, not a second command.
    counter = BadSampleCounter(1.0)
    assert list(iter_shard(f"pipe:cat {tmp_path}/none.tar ; touch {marker}", counter)) == []
    time.sleep(0.1)
    assert not marker.exists() and counter.bad == 1


# 2. No good checkpoint is lost -----------------------------------------------------------------
def _nan_at(monkeypatch, bad_step: int):
    real = ldae_obj.LDAEMethod.__call__

    def poisoned(self, model, batch, step, *args, **kw):
        loss = real(self, model, batch, step, *args, **kw)
        return loss * float("nan") if step == bad_step else loss

    monkeypatch.setattr(ldae_obj.LDAEMethod, "__call__", poisoned)


def test_nan_between_log_steps_writes_no_nan_checkpoint(tmp_path, monkeypatch):
    _nan_at(monkeypatch, 2)  # step 3 (1-based) is bad; the next log step is 4
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="step 3") as e:
        train(_cfg(out, **{"engine.steps": 8, "engine.log_every": 4, "engine.ckpt_every": 1,
                           "engine.keep_last": 2}))
    names = [d.name for d in ck.list_checkpoints(out)]
    assert names == ["step_00000001", "step_00000002"]
    assert "step_00000002" in str(e.value)  # names the newest good checkpoint
    for d in ck.list_checkpoints(out):
        st = ck.load_state(d)
        assert all(torch.isfinite(v).all() for v in st["model"].values())


def test_non_finite_weights_with_a_finite_loss_are_not_saved(tmp_path, monkeypatch):
    from ldae_fast.engine import loop as loop_mod

    real = loop_mod.SingleDevice.step
    calls = []

    def poisoning(self, lr):
        norm = real(self, lr)
        calls.append(1)
        if len(calls) == 2:  # after the loss of step 2 was computed (finite)
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return norm

    monkeypatch.setattr(loop_mod.SingleDevice, "step", poisoning)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"weights became non-finite by step 2.*step_00000001"):
        train(_cfg(out, **{"engine.steps": 6, "engine.log_every": 6, "engine.ckpt_every": 1,
                           "optim.ema_decay": 0}))
    assert [d.name for d in ck.list_checkpoints(out)] == ["step_00000001"]


def test_keep_last_never_prunes_the_newest_finite(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, **{"engine.steps": 2}))
    good = ck.latest_checkpoint(out)
    # Two later checkpoints that are not known to be finite (written by something else).
    for step in (3, 4):
        d = ck.ckpt_root(out) / f"step_{step:08d}"
        d.mkdir()
        (d / "state.pt").write_bytes(b"x")
        (d / "meta.json").write_text(json.dumps({"format_version": 2, "step": step, "files": {}}))
    ck._prune(out, 1, just_written=ck.ckpt_root(out) / "step_00000004")
    assert good.exists() and ck.newest_good(out) == good


def test_finite_divergence_stops_naming_the_step(tmp_path):
    with pytest.raises(Diverged, match=r"since step 2.*at step 4"):
        train(_cfg(tmp_path / "run", **{"engine.steps": 10, "engine.diverge_grad_norm": 1e-9,
                                        "engine.diverge_checks": 2}))


def test_checkpoints_written_while_diverging_do_not_prune_the_last_healthy_one(tmp_path, monkeypatch):
    real = DivergenceGuard.observe

    def diverging_from_step_6(self, step, grad_norm, good=None):
        return real(self, step, 1.0 if step <= 4 else float("inf"), good)

    monkeypatch.setattr(DivergenceGuard, "observe", diverging_from_step_6)
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"since step 6.*Newest good checkpoint: \S*step_00000004"):
        train(_cfg(out, **{"engine.steps": 40, "engine.ckpt_every": 2, "engine.keep_last": 2,
                           "engine.diverge_checks": 4}))
    # 6, 8, 10 were written while the guard counted; keep_last=2 keeps 8 and 10, and 4 survives.
    assert [d.name for d in ck.list_checkpoints(out)] == ["step_00000004", "step_00000008", "step_00000010"]
    assert ck.newest_good(out).name == "step_00000004"


def test_divergence_guard_counts_consecutive_checks():
    g = DivergenceGuard(bound=10.0, checks=3)
    g.observe(1, float("inf"))
    g.observe(2, 50.0)
    g.observe(3, 1.0)  # a good check resets the count
    g.observe(4, float("nan"))
    g.observe(5, 11.0)
    with pytest.raises(Diverged, match="since step 4"):
        g.observe(6, float("inf"))
    DivergenceGuard(bound=0.0, checks=1).observe(1, 1e30)  # bound 0: only non-finite counts


@pytest.mark.parametrize("damage", ["truncated", "zero", "missing", "bitflip"])
def test_damaged_newest_checkpoint_falls_back(trained, tmp_path, damage):
    run = _copy_run(trained, tmp_path / "run")
    newest = ck.latest_checkpoint(run)
    p = newest / "state.pt"
    data = p.read_bytes()
    if damage == "truncated":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "zero":
        p.write_bytes(b"")
    elif damage == "missing":
        p.unlink()
    else:
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        p.write_bytes(bytes(flipped))
    with pytest.warns(UserWarning, match=newest.name):
        got = ck.resolve_resume("auto", run)
    assert got.name == "step_00000002"
    with pytest.raises(CheckpointError, match="damaged"):
        ck.resolve_resume(str(newest), run)  # named explicitly: refused, not replaced
    if damage == "bitflip":  # the run itself resumes from the intact one
        with pytest.warns(UserWarning, match=newest.name):
            res = train(_cfg(run, **{"engine.steps": 6, "engine.ckpt_every": 2, "engine.keep_last": 3,
                                     "engine.resume": "auto"}))
        assert res.checkpoint.name == "step_00000006"


def test_resume_with_another_model_shape_is_one_clear_error(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    with pytest.raises(ResumeMismatch, match="model.width 32 -> 64"):
        train(_cfg(run, **{"engine.steps": 6, "engine.resume": "auto", "model.width": 64}))


# 3. A run owns its directory -------------------------------------------------------------------
def test_fresh_run_into_an_old_directory_is_refused_or_overwritten(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    with pytest.raises(RunDirError, match="already holds checkpoints.*step_00000004"):
        train(_cfg(run, **{"engine.steps": 2}))
    assert [d.name for d in ck.list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    with pytest.warns(UserWarning, match="deleted 2 checkpoint"):
        res = train(_cfg(run, **{"engine.steps": 2, "engine.overwrite": "true"}))
    assert [d.name for d in ck.list_checkpoints(run)] == ["step_00000002"] == [res.checkpoint.name]
    assert ck.load_state(res.checkpoint)["step"] == 2 and not (run / rundir.LOCK).exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]  # the old run's lines went with its checkpoints


def test_lock_refuses_a_second_owner_and_takes_over_a_stale_one(tmp_path):
    lock = rundir.acquire(tmp_path)
    with pytest.raises(RunDirError, match="in use by another run"):
        rundir.acquire(tmp_path)
    rundir.release(lock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    (tmp_path / rundir.LOCK).write_text(f"{dead.pid} {socket.gethostname()}\n")
    with pytest.warns(UserWarning, match="stale lock"):
        lock = rundir.acquire(tmp_path)
    rundir.release(lock)
    assert not lock.exists()


def _train_cmd(out, *extra):
    args = [f"--{k}={v}" for k, v in TINY.items()]
    return [sys.executable, str(ROOT / "train.py"), *args, f"--engine.out_dir={out}", *extra]


_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_two_concurrent_runs_into_one_directory(tmp_path):
    out = tmp_path / "run"
    a = subprocess.Popen(_train_cmd(out, "--engine.steps=100000"), env=_ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (out / rundir.LOCK).exists():
            assert a.poll() is None and time.time() < deadline, "first run did not start"
            time.sleep(0.05)
        b = subprocess.run(_train_cmd(out, "--engine.steps=2"), env=_ENV, capture_output=True, text=True,
                           timeout=120)
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    assert b.returncode == 9, b.stderr
    lines = b.stderr.strip().splitlines()
    assert "in use by another run" in lines[-1] and f"process {a.pid}" in lines[-1]
    assert "Traceback" not in b.stderr


@pytest.mark.slow
@pytest.mark.parametrize("point", ck.KILL_POINTS)
def test_kill_inside_the_checkpoint_write_then_resume(tmp_path, point):
    out = tmp_path / "run"
    common = ("--engine.steps=6", "--engine.ckpt_every=2", "--engine.keep_last=2")
    # Killed in the write of the first checkpoint (step 2).
    p = subprocess.run(_train_cmd(out, *common), env={**_ENV, ck.KILL_ENV: point}, capture_output=True,
                       timeout=300)
    assert p.returncode == -signal.SIGKILL
    complete = [d.name for d in ck.list_checkpoints(out)]
    assert complete == (["step_00000002"] if point == "before_pointer" else [])  # renamed or not
    r = subprocess.run(_train_cmd(out, *common, "--engine.resume=auto"), env=_ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("resumed from" in r.stdout) == (point == "before_pointer")
    final = ck.latest_checkpoint(out)
    assert final.name == "step_00000006" and ck.verify_checkpoint(final) is None
    assert ck.read_latest_pointer(out) == final


# 4. Data -------------------------------------------------------------------------------------
def _jpeg(size=8):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("cls, why", [
    (b"99999999999999999999", "too large"), (b"-7", "negative"), (b"3.5", "not a non-negative integer"),
    (b"seven", "not a non-negative integer"), (b"\xff\xfe", "unreadable"), (b"12", "num_classes=10"),
])
def test_bad_labels_are_counted_bad_samples(tmp_path, cls, why, caplog):
    url = _tar(tmp_path / "s.tar", [("good", {"jpg": _jpeg(), "cls": b"3"}), ("evil", {"jpg": _jpeg(), "cls": cls})])
    counter = BadSampleCounter(1.0)
    got = list(iter_shard(url, counter, LabelPolicy(num_classes=10)))
    assert [(s.key, s.label) for s in got] == [("good", 3)] and counter.bad == 1
    assert why in counter.recent[0] and "'evil'" in counter.recent[0] and "s.tar" in counter.recent[0]


def test_labels_are_optional_for_pretraining_and_required_for_eval(tmp_path):
    from ldae_fast.data import build_eval_arrays, build_train_stream

    samples = [(f"k{i:03d}", {"jpg": _jpeg()}) for i in range(16)]
    url = _tar(tmp_path / "nolabel-0.tar", samples)
    cfg = build_config("demo", {"data.source": "wds", "data.train_shards": url, "data.val_shards": url,
                                "data.img_size": "8", "data.batch_size": "8", "data.epoch_size": "16"})
    _, y = next(iter(build_train_stream(cfg)))
    assert y.tolist() == [-1] * 8
    with pytest.raises(DataError, match=r"nolabel-0\.tar key 'k000' has no \.cls label"):
        build_eval_arrays(cfg, "val")


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_member_claiming_more_than_the_shard_is_a_broken_shard(tmp_path, gz):
    url = _tar(tmp_path / "t.tar", [("a", {"jpg": _jpeg(), "cls": b"1"}), ("b", {"jpg": _jpeg(), "cls": b"2"})])
    raw = bytearray(Path(url).read_bytes())
    # Third header ("b.jpg"): claim 1 TiB in GNU base-256, then fix the header checksum.
    off = next(i for i in range(0, len(raw), 512) if raw[i:i + 5] == b"b.cls")
    raw[off + 124:off + 136] = b"\x80" + (1 << 40).to_bytes(11, "big")
    raw[off + 148:off + 156] = b" " * 8
    raw[off + 148:off + 156] = b"%06o\0 " % sum(raw[off:off + 512])
    import gzip
    path = tmp_path / ("big.tar.gz" if gz else "big.tar")
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    counter = BadSampleCounter(1.0)
    got = list(iter_shard(str(path), counter))
    assert [s.key for s in got] == ["a"] and counter.bad == 1
    assert path.name in counter.recent[0] and "claims 1099511627776 bytes" in counter.recent[0]
    with pytest.raises(OSError, match="claims"):
        list(iter_tar(open(path, "rb")))


def test_images_over_the_pixel_limit_are_bad_before_decoding(tmp_path, monkeypatch):
    from ldae_fast.data import build_train_stream

    big = io.BytesIO()
    Image.new("RGB", (300, 200)).save(big, format="PNG")
    samples = [(f"k{i:03d}", {"jpg": _jpeg(), "cls": b"0"}) for i in range(16)]
    samples.insert(3, ("huge", {"png": big.getvalue(), "cls": b"0"}))
    url = _tar(tmp_path / "px-0.tar", samples)
    cfg = build_config("demo", {"data.source": "wds", "data.train_shards": url, "data.img_size": "8",
                                "data.batch_size": "8", "data.epoch_size": "16", "data.shuffle_buffer": "1",
                                "data.max_image_pixels": "50000"})
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    s = build_train_stream(cfg)
    it = iter(s)
    _, _ = next(it), next(it)  # 16 good samples + the huge one
    assert s.stats() == {"good": 16, "bad": 1}
    assert decoded and (300, 200) not in decoded  # refused from the header, never decoded


def test_pixel_limit_counts_and_names_the_key(tmp_path):
    from ldae_fast.data.transforms import ImageTooLarge, open_image

    big = io.BytesIO()
    Image.new("RGB", (300, 200)).save(big, format="PNG")
    with pytest.raises(ImageTooLarge, match="max_image_pixels=50000"):
        open_image(big.getvalue(), 50000)
    assert open_image(big.getvalue(), 60000).size == (300, 200)


def test_bad_rate_limit_is_a_data_error_naming_shards(tmp_path):
    from ldae_fast.data import build_train_stream

    samples = [(f"k{i:03d}", {"jpg": _jpeg() if i % 2 else b"junk", "cls": b"0"}) for i in range(240)]
    url = _tar(tmp_path / "half-0.tar", samples)
    cfg = build_config("demo", {"data.source": "wds", "data.train_shards": url, "data.img_size": "8",
                                "data.batch_size": "8", "data.epoch_size": "120"})
    with warnings.catch_warnings(), pytest.raises(DataError, match=r"too many bad samples.*half-0\.tar"):
        for _ in zip(range(30), build_train_stream(cfg)):
            pass


# 5. Config validation --------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["optim.lr", "noise.sigma_max", "model.mlp_ratio", "optim.blr",
                                 "engine.diverge_grad_norm"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_numbers_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config("demo", {key: value})


def test_config_file_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"width": 32,}}')
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        parse_cli(["--config", str(bad)])
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"model": {"width": "wide"}}))
    with pytest.raises(ConfigError, match=r"typed\.json: model\.width: expected an integer"):
        parse_cli(["--config", str(typed)])
    inf = tmp_path / "inf.json"
    inf.write_text('{"optim": {"lr": Infinity}}')
    with pytest.raises(ConfigError, match=r"inf\.json: not valid JSON.*Infinity"):
        parse_cli(["--config", str(inf)])
    huge = tmp_path / "huge.json"
    huge.write_text('{"optim": {"lr": 1e999}}')
    with pytest.raises(ConfigError, match=r"huge\.json: optim\.lr=inf must be a finite number"):
        parse_cli(["--config", str(huge)])
