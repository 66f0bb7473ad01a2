"""Nothing lost, one clear line (issue 21, items 3-12): damaged or diverging checkpoints are
skipped on resume, a failed checkpoint write is named, a changed network is exit 7, tokenizer files
are validated at load, a run that did its job exits 0. Tiny models, a few steps, CPU."""

import json
import shutil
import warnings
from pathlib import Path

import pytest

from ldae_fast.config import build_config
from ldae_fast.engine import checkpoint as ck
from ldae_fast.engine import rundir
from ldae_fast.engine.loop import train
from ldae_fast.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
    "data.img_size": "16", "data.batch_size": "8", "data.synthetic_images": "64", "tokenizer.fit_images": "32",
    "engine.kernels": "reference", "engine.log_every": "2", "engine.progress": "false", "optim.blr": "1e-3",
    "optim.warmup_epochs": "0.5", "eval.probe": "false", "eval.figure": "false",
}


def _cfg(out, **over):
    return build_config("demo", {**TINY, "engine.out_dir": str(out), **{k: str(v) for k, v in over.items()}})


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """A finished run with intact checkpoints at steps 2, 4 and 6 (copied by tests that alter it)."""
    out = tmp_path_factory.mktemp("robust") / "run"
    train(_cfg(out, **{"engine.steps": 6, "engine.ckpt_every": 2, "engine.keep_last": 3}))
    assert [d.name for d in ck.list_checkpoints(out)] == ["step_00000002", "step_00000004", "step_00000006"]
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / rundir.LOCK).unlink(missing_ok=True)
    return dst


def _set_meta(d: Path, **fields) -> None:
    meta = json.loads((d / "meta.json").read_text())
    meta.update(fields)
    (d / "meta.json").write_text(json.dumps(meta))


# 3. An unreadable meta.json is damage like any other ------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-an-object"])
def test_unreadable_meta_of_the_newest_checkpoint_falls_back(run3, tmp_path, damage):
    run = _copy(run3, tmp_path / "run")
    newest = ck.latest_checkpoint(run)
    meta = newest / "meta.json"
    if damage == "garbage":
        meta.write_bytes(b"\x00\xff not json")
    elif damage == "truncated":
        meta.write_text(meta.read_text()[:20])
    else:
        meta.write_text("[1, 2]")
    with pytest.warns(UserWarning, match=f"{newest.name}.*meta.json"):
        got = ck.resolve_resume("auto", run)
    assert got.name == "step_00000004"
    with pytest.raises(CheckpointError, match="meta.json"):
        ck.resolve_resume(str(newest), run)  # named explicitly: refused, not replaced
    with pytest.warns(UserWarning, match=newest.name):
        res = train(_cfg(run, **{"engine.steps": 8, "engine.ckpt_every": 2, "engine.keep_last": 3,
                                 "engine.resume": "auto"}))
    assert res.checkpoint.name == "step_00000008"


# 7. A checkpoint written while the run was diverging is not the one a resume picks -------------
def test_auto_resume_skips_diverging_checkpoints_and_says_so(run3, tmp_path):
    run = _copy(run3, tmp_path / "run")
    cks = ck.list_checkpoints(run)
    for d in cks[1:]:
        _set_meta(d, diverging=True)
    with pytest.warns(UserWarning, match=r"step_00000006, step_00000004\) were written while the run was "
                                         r"diverging.*resuming from step_00000002"):
        got = ck.resolve_resume("auto", run)
    assert got == cks[0]
    assert ck.resolve_resume(str(cks[2]), run) == cks[2]  # named explicitly: taken as named


def test_only_diverging_checkpoints_resume_from_the_newest_with_a_warning(run3, tmp_path):
    run = _copy(run3, tmp_path / "run")
    cks = ck.list_checkpoints(run)
    for d in cks:
        _set_meta(d, diverging=True)
    with pytest.warns(UserWarning, match="every intact checkpoint.*diverging.*step_00000006"):
        assert ck.resolve_resume("auto", run) == cks[-1]


def test_a_healthy_newest_checkpoint_resumes_without_a_warning(run3, tmp_path):
    run = _copy(run3, tmp_path / "run")
    _set_meta(ck.list_checkpoints(run)[0], diverging=True)  # only an older one diverged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.resolve_resume("auto", run).name == "step_00000006"


# 6. Any change of the network is exit 7 naming what changed, never a size-mismatch traceback ----
def _argv(out, **over):
    return [f"--{k}={v}" for k, v in {**TINY, "engine.out_dir": out, **over}.items()]


@pytest.mark.parametrize("change, named", [({"model.layout": "dit"}, "model.layout mae -> dit"),
                                           ({"model.adaln_dim": 8}, "model.adaln_dim 32 -> 8"),
                                           ({"model.class_cond": "true"}, "model.class_cond False -> True"),
                                           ({"model.mlp_ratio": 2}, "model.mlp_ratio 4.0 -> 2")])
def test_resume_with_another_network_is_exit_7_naming_the_field(run3, tmp_path, capsys, change, named):
    from ldae_fast.train import main

    run = _copy(run3, tmp_path / "run")
    code = main(_argv(run, **{"engine.steps": 8, "engine.resume": "auto"}, **change))
    err = capsys.readouterr().err
    assert code == 7, err
    assert "Traceback" not in err and "size mismatch" not in err
    assert named in err.strip().splitlines()[-1]


def test_adaln_dim_spelled_out_as_its_default_is_the_same_network(run3, tmp_path):
    run = _copy(run3, tmp_path / "run")  # mae layout: adaln_dim 0 means the width, 32
    res = train(_cfg(run, **{"engine.steps": 8, "engine.ckpt_every": 2, "engine.keep_last": 3,
                             "engine.resume": "auto", "model.adaln_dim": 32}))
    assert res.checkpoint.name == "step_00000008"


def test_a_shape_change_the_config_comparison_misses_is_still_exit_7(run3, tmp_path, monkeypatch):
    from ldae_fast.engine import guard
    from ldae_fast.errors import ResumeMismatch

    monkeypatch.setattr(guard, "model_shape_diff", lambda saved, cfg: [])  # the backstop alone
    run = _copy(run3, tmp_path / "run")
    with pytest.raises(ResumeMismatch, match=r"another network \(.*(blocks|embed|final).*differ"):
        train(_cfg(run, **{"engine.steps": 8, "engine.resume": "auto", "model.width": 64}))
