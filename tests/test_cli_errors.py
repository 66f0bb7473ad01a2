"""Every CLI turns a user error into one stderr line and the exit code of its kind (README,
"Exit codes"); --debug / LDAE_DEBUG=1 bring the traceback back. Table-driven, in process (a
subprocess case checks the real exit status)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_DEMO as TINY

from ldae_fast.config import build_config
from ldae_fast.engine import checkpoint as ck
from ldae_fast.engine import rundir
from ldae_fast.engine.loop import train
from ldae_fast.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parent.parent
FLAGS = [f"--{k}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Files the bad inputs point at: a finished run, broken config files, broken shards."""
    import io
    import tarfile

    from PIL import Image

    d = tmp_path_factory.mktemp("cli")
    train(build_config("demo", {**TINY, "engine.out_dir": str(d / "run"), "engine.steps": "2"}))
    (d / "bad.json").write_text('{"model": {"width": 32,,}}')
    (d / "typed.json").write_text(json.dumps({"optim": {"blr": "fast"}}))
    old = d / "oldrun"
    import shutil
    shutil.copytree(d / "run", old)
    meta_p = ck.latest_checkpoint(old) / "meta.json"
    meta = json.loads(meta_p.read_text())
    meta.pop("format_version")
    meta_p.write_text(json.dumps(meta))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    with tarfile.open(d / "junk-0.tar", "w") as tar:
        for i in range(200):
            data = buf.getvalue() if i % 3 == 0 else b"not an image"
            for ext, payload in (("jpg", data), ("cls", b"0")):
                info = tarfile.TarInfo(f"k{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return d


def _train_main(argv):
    from ldae_fast.train import main
    return main(argv)


def _cmd(name):
    import importlib

    from ldae_fast.cli import COMMANDS
    if name == "train":
        return _train_main
    mod, fn, _ = COMMANDS[name]
    return getattr(importlib.import_module(mod), fn)


C = EXIT_CODES
WDS = ["--data.source=wds", "--data.epoch_size=64"]
# (id, command, argv (with {d}: the env dir, {out}: a fresh out dir), exit code, text in the line)
CASES = [
    ("unknown-flag", "train", ["--bogus"], C["config"], "unknown arguments: --bogus"),
    ("unknown-section", "train", ["--modle.width=3"], C["config"], "unknown config section 'modle'"),
    ("bad-int", "train", ["--model.width=abc"], C["config"], "model.width"),
    ("bad-bool", "train", ["--engine.compile=maybe"], C["config"], "engine.compile"),
    ("inf-lr", "train", ["--optim.lr=inf"], C["config"], "optim.lr"),
    ("nan-sigma", "train", ["--noise.sigma_max=nan"], C["config"], "noise.sigma_max"),
    ("inf-mlp", "train", ["--model.mlp_ratio=inf"], C["config"], "model.mlp_ratio"),
    ("bad-choice", "train", ["--model.size=huge"], C["config"], "model.size='huge'"),
    ("no-value", "train", ["--preset"], C["config"], "--preset needs a value"),
    ("config-missing", "train", ["--config={d}/nope.json"], C["config"], "nope.json"),
    ("config-bad-json", "train", ["--config={d}/bad.json"], C["config"], "bad.json: not valid JSON"),
    ("config-bad-type", "train", ["--config={d}/typed.json"], C["config"], "typed.json: optim.blr"),
    ("resume-missing", "train", ["--engine.resume={d}/nothing"], C["file"], "nothing"),
    ("tokenizer-not-safetensors", "train", ["--tokenizer.path={d}/bad.json"], C["file"], "tokenizer.path="),
    ("shards-missing", "train", [*WDS, "--data.train_shards={d}/none-{{0..1}}.tar"], C["data"], "none-0.tar"),
    ("bad-rate", "train", [*WDS, "--data.train_shards={d}/junk-0.tar", "--engine.steps=4"], C["data"],
     "too many bad samples"),
    ("bad-rate-in-worker", "train", [*WDS, "--data.train_shards={d}/junk-0.tar", "--engine.steps=4",
                                     "--data.num_workers=1"], C["data"], "data error: too many bad samples"),
    ("old-format", "train", ["--engine.out_dir={d}/oldrun", "--engine.resume=auto", "--engine.steps=4"],
     C["checkpoint"], "format version 1"),
    ("resume-shape", "train", ["--engine.out_dir={d}/run", "--engine.resume=auto", "--engine.steps=4",
                               "--model.width=64"], C["resume-mismatch"], "model.width 32 -> 64"),
    ("resume-batch", "train", ["--engine.out_dir={d}/run", "--engine.resume=auto", "--engine.steps=4",
                               "--data.batch_size=4"], C["resume-mismatch"], "data.batch_size 8 -> 4"),
    ("fresh-into-old", "train", ["--engine.out_dir={d}/run", "--engine.steps=2"], C["run-dir"],
     "already holds checkpoints"),
    ("non-finite", "train", ["--optim.lr=1e30", "--optim.clip_grad=0", "--engine.diverge_checks=0",
                             "--engine.steps=6"], C["non-finite"], "non-finite"),
    ("divergence", "train", ["--engine.diverge_grad_norm=1e-9", "--engine.diverge_checks=1",
                             "--engine.steps=4"], C["divergence"], "diverged"),
    ("eval-no-checkpoint", "eval", ["--checkpoint", "{d}/nope"], C["file"], "nope"),
    ("eval-missing-flag", "eval", [], C["config"], "--checkpoint"),
    ("eval-bad-protocol", "eval", ["--checkpoint", "{d}/run", "--protocols", "magic"], C["config"], "magic"),
    ("eval-old-format", "eval", ["--checkpoint", "{d}/oldrun", "--out", "{out}"], C["checkpoint"],
     "format version 1"),
    ("eval-inf-blr", "eval", ["--checkpoint", "{d}/run", "--blr", "inf"], C["config"], "finite"),
    ("featlearn-nan-lr", "featlearn", ["synthetic", "--clf-lr", "nan"], C["config"], "finite"),
    ("eval-bad-int", "eval", ["--checkpoint", "{d}/run", "--epochs", "many"], C["config"], "--epochs"),
    ("export-missing", "export", ["{d}/nope", "{out}/e.safetensors"], C["file"], "nope"),
    ("export-no-args", "export", [], C["config"], "required"),
    ("fit-pca-no-out", "fit-pca", ["--out"], C["config"], "--out needs a file path"),
    ("fit-pca-bad-field", "fit-pca", ["--tokenizer.latent_dim=0"], C["config"], "tokenizer.latent_dim"),
    ("fit-pca-no-shards", "fit-pca", [*WDS, "--data.train_shards=", "--out", "{out}/t.safetensors"],
     C["data"], "data.train_shards is empty"),
    ("make-shards-no-src", "make-shards", ["{d}/nope", "{out}/s-%d.tar"], C["file"], "nope"),
    ("make-shards-bad-int", "make-shards", ["{d}", "{out}/s-%d.tar", "--maxcount", "x"], C["config"],
     "--maxcount"),
    ("featlearn-unknown", "featlearn", ["no-such-experiment"], C["config"], "no-such-experiment"),
    ("featlearn-bad-width", "featlearn", ["synthetic", "--m", "0", "--out", "{out}"], C["config"], "width m"),
]


@pytest.mark.parametrize("name, cmd, argv, code, text", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_its_exit_code(env, tmp_path, capsys, monkeypatch, name, cmd, argv,
                                                  code, text):
    monkeypatch.delenv("LDAE_DEBUG", raising=False)
    args = [a.format(d=env, out=tmp_path / "out") for a in argv]
    if cmd in ("train", "fit-pca"):
        own = any(a.startswith("--engine.out_dir") for a in args)
        args = FLAGS + ([] if own else [f"--engine.out_dir={tmp_path / 'run'}"]) + args
    rc = _cmd(cmd)(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, err
    assert "Traceback" not in err and "Caught" not in err
    assert len(lines) == 1, err
    assert text in lines[0], lines[0]


def test_lock_held_is_one_line(env, tmp_path, capsys):
    out = tmp_path / "busy"
    lock = rundir.acquire(out)
    try:
        rc = _train_main(FLAGS + [f"--engine.out_dir={out}", "--engine.steps=2"])
    finally:
        rundir.release(lock)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == C["run-dir"] and len(err) == 1 and "in use by another run" in err[0]


def test_unknown_command_is_one_line(capsys):
    from ldae_fast.cli import main

    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "frobnicate" in err[0]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(env, tmp_path, capsys, monkeypatch, how):
    argv = ["--optim.lr=inf"]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("LDAE_DEBUG", "1")
    assert _train_main(argv) == C["config"]
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("train.py: config error")


def test_exit_codes_are_distinct_and_documented():
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES) and 0 not in EXIT_CODES.values()
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code in EXIT_CODES.values():
        assert f"| {code} |" in section, code


def test_real_process_exit_status(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LDAE_DEBUG", None)
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--noise.sigma_max=inf"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == C["config"] and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("train.py: config error: noise.sigma_max")


def _write_not_an_export(d: Path, kind: str) -> Path:
    """A .safetensors path holding something `ldae-fast export` did not write."""
    import torch
    from safetensors.torch import save_file

    p = d / f"{kind}.safetensors"
    if kind == "text":
        p.write_text("this is not a safetensors file\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        save_file({"w": torch.zeros(64, 64)}, str(p), metadata={"timm_kwargs": "{}", "ldae_config": "{}"})
        p.write_bytes(p.read_bytes()[:200])
    elif kind == "foreign":  # a valid safetensors file of someone else's weights
        save_file({"w": torch.zeros(2, 2)}, str(p))
    elif kind == "bad-metadata":
        save_file({"w": torch.zeros(2, 2)}, str(p), metadata={"timm_kwargs": "{nope", "ldae_config": "{}"})
    elif kind == "wrong-weights":
        save_file({"w": torch.zeros(2, 2)}, str(p), metadata={"timm_kwargs": json.dumps({"embed_dim": 32}),
                                                                "ldae_config": "{}"})
    return p


@pytest.mark.parametrize("kind, text", [("text", "not a readable safetensors file"),
                                        ("empty", "not a readable safetensors file"),
                                        ("truncated", "not a readable safetensors file"),
                                        ("foreign", "not written by `ldae-fast export`"),
                                        ("bad-metadata", "not valid JSON"),
                                        ("wrong-weights", "do not fit")])
def test_eval_of_a_safetensors_file_that_is_not_an_export(tmp_path, capsys, monkeypatch, kind, text):
    monkeypatch.delenv("LDAE_DEBUG", raising=False)
    p = _write_not_an_export(tmp_path, kind)
    rc = _cmd("eval")(["--checkpoint", str(p), "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == C["file"] and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("ldae-fast eval: file error: ") and str(p) in lines[0] and text in lines[0]
