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


@pytest.mark.parametrize("change, named", [({"ldae.layout": "dit"}, "ldae.layout mae -> dit"),
                                           ({"ldae.adaln_dim": 8}, "ldae.adaln_dim 32 -> 8"),
                                           ({"model.adaln_dim": 8}, "ldae.adaln_dim 32 -> 8"),  # old spelling
                                           ({"ldae.class_cond": "true"}, "ldae.class_cond False -> True"),
                                           ({"model.class_cond": "true"}, "ldae.class_cond False -> True"),  # old spelling
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
                             "engine.resume": "auto", "ldae.adaln_dim": 32}))
    assert res.checkpoint.name == "step_00000008"


def test_a_field_the_network_does_not_read_does_not_block_a_resume(run3, tmp_path):
    run = _copy(run3, tmp_path / "run")  # an l-DAE run: the DiffMAE / MAE decoder width builds nothing here
    res = train(_cfg(run, **{"engine.steps": 8, "engine.ckpt_every": 2, "engine.keep_last": 3,
                             "engine.resume": "auto", "model.decoder_width": 64}))
    assert res.checkpoint.name == "step_00000008"


def test_a_shape_change_the_config_comparison_misses_is_still_exit_7(run3, tmp_path, monkeypatch):
    from ldae_fast.engine import guard
    from ldae_fast.errors import ResumeMismatch

    monkeypatch.setattr(guard, "model_shape_diff", lambda saved, cfg: [])  # the backstop alone
    run = _copy(run3, tmp_path / "run")
    with pytest.raises(ResumeMismatch, match=r"another network \(.*(blocks|embed|final).*differ"):
        train(_cfg(run, **{"engine.steps": 8, "engine.resume": "auto", "model.width": 64}))


# 4. A checkpoint write that fails is named, leaves nothing half-written, and is retried ---------
def _failing_save(monkeypatch, fail_steps, err=None):
    import errno
    import os

    real = ck._save_tensors

    def save(state, path):
        if state["step"] in fail_steps:
            with open(path, "wb") as f:
                f.write(b"partial")  # what a full disk leaves behind
            raise err or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(state, path)

    monkeypatch.setattr(ck, "_save_tensors", save)


def test_a_failed_periodic_write_warns_and_the_next_interval_retries(tmp_path, monkeypatch):
    _failing_save(monkeypatch, {4})
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"checkpoint of step 4 into .*checkpoints: no space left on the "
                                         r"device; the partial write was removed and the previous checkpoint "
                                         r"\S*step_00000002 is intact; training goes on"):
        res = train(_cfg(out, **{"engine.steps": 8, "engine.ckpt_every": 2, "engine.keep_last": 5}))
    assert [d.name for d in ck.list_checkpoints(out)] == ["step_00000002", "step_00000006", "step_00000008"]
    assert res.checkpoint.name == "step_00000008"
    assert not list(ck.ckpt_root(out).glob(".tmp-*"))  # atomic: nothing half-written is left
    for d in ck.list_checkpoints(out):
        assert ck.verify_checkpoint(d) is None


def test_consecutive_failed_writes_stop_the_run_naming_the_cause(tmp_path, monkeypatch):
    import errno

    from ldae_fast.errors import FileProblem

    _failing_save(monkeypatch, {4, 6}, OSError(errno.EDQUOT, "Disk quota exceeded"))
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="step 4"), pytest.raises(
            FileProblem, match=r"step 6 .*disk quota exceeded.*step_00000002 is intact.*2 checkpoint writes in a row"):
        train(_cfg(out, **{"engine.steps": 20, "engine.ckpt_every": 2, "engine.ckpt_write_failures": 2}))
    assert [d.name for d in ck.list_checkpoints(out)] == ["step_00000002"]
    assert not list(ck.ckpt_root(out).glob(".tmp-*"))


@pytest.mark.slow
def test_a_file_size_limit_ends_in_one_line_and_exit_4(tmp_path):
    """The real thing: `ulimit -f` under the state file's size (EFBIG; SIGXFSZ ignored, as a shell
    with `trap '' XFSZ` would), in a child process."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *_argv(out, **{"engine.steps": 4, "engine.ckpt_every": 2})]
    p = subprocess.run(cmd, preexec_fn=limit, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert p.returncode == 4, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "inline_container" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert f"checkpoint of step 4 into {ck.ckpt_root(out)}" in last
    assert "file too large" in last and "no earlier checkpoint exists" in last
    assert "step 2" in p.stderr and "tries again" in p.stderr  # the periodic one warned first
    assert not ck.list_checkpoints(out) and not list(ck.ckpt_root(out).glob(".tmp-*"))


def test_ckpt_every_s_checkpoints_on_the_clock(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, **{"engine.steps": 4, "engine.ckpt_every_s": 1e-6, "engine.keep_last": 10}))
    assert [ck.step_of(d) for d in ck.list_checkpoints(out)] == [1, 2, 3, 4]
    out = tmp_path / "run2"  # a long interval: only the final one
    train(_cfg(out, **{"engine.steps": 4, "engine.ckpt_every_s": 3600, "engine.keep_last": 10}))
    assert [ck.step_of(d) for d in ck.list_checkpoints(out)] == [4]


# 11. One exit code per kind; ablate rows checkpoint on the clock ---------------------------------
@pytest.mark.parametrize("tool", ["make-shards", "write-video-shards"])
def test_a_missing_source_folder_is_a_file_error_in_every_shard_writer(tmp_path, capsys, tool):
    from ldae_fast.cli import main

    missing = tmp_path / "missing"
    assert main([tool, str(missing), str(tmp_path / "out" / "s-%03d.tar")]) == 4
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(missing) in last and "file error" in last


def test_ablate_rows_checkpoint_every_few_minutes(tmp_path):
    from ldae_fast.eval.ablate import row_config

    cfg, _ = row_config("pca-d8", "synthetic", 64, {}, tmp_path, 0.1)
    assert 0 < cfg.engine.ckpt_every_s <= 600 and cfg.engine.resume == "auto"
    cfg, _ = row_config("pca-d8", "synthetic", 64, {"engine.ckpt_every_s": "60"}, tmp_path, 0.1)
    assert cfg.engine.ckpt_every_s == 60


# 10. eval's messages name eval's own flag --------------------------------------------------------
@pytest.mark.parametrize("what", ["text-file", "empty-dir", "missing"])
def test_eval_on_a_path_that_is_not_a_checkpoint_names_checkpoint_not_resume(tmp_path, capsys, what):
    from ldae_fast.cli import main

    p = tmp_path / what
    if what == "text-file":
        p.write_text("not a checkpoint\n")
    elif what == "empty-dir":
        p.mkdir()
    code = main(["eval", "--checkpoint", str(p), "--data", "synthetic"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code in (4, 6) and "Traceback" not in err
    assert f"--checkpoint {p}" in last and "--resume" not in err


def test_eval_takes_a_run_directory_or_its_checkpoints_folder(run3):
    from ldae_fast.eval.reader import load_for_eval

    for p in (run3, run3 / "checkpoints"):
        cfg, model, _ = load_for_eval(p, flag="--checkpoint")
        assert cfg.model.width == 32


# 5. A tokenizer file is validated at load, naming the input file --------------------------------
def _write_tokenizer(path: Path, tensors: dict, meta: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"ldae_tokenizer": json.dumps(meta)})
    return path


def _pca_file(tmp_path: Path, alter=None, kind="pca", name="tok.safetensors") -> Path:
    import torch

    from ldae_fast.tokenizers import PixelTokenizer
    from ldae_fast.tokenizers.pca import fit_pca

    g = torch.Generator().manual_seed(0)
    if kind == "pixel":
        tok = PixelTokenizer.create(4)
        tok.d = 16  # the run's latent_dim (TINY's demo: d=16 of D=48)
    else:
        tok = fit_pca([torch.randn(16, 3, 16, 16, generator=g)], 4, 16, 16)
    tensors = tok.state_dict()
    meta = tok.metadata()
    if alter:
        alter(tensors, meta)
    return _write_tokenizer(tmp_path / name, tensors, meta)


def _skew(t, m):
    t["basis"][0] *= 1.5  # a row no longer of unit length


def _nan(t, m):
    t["mean"][3] = float("nan")


def _short(t, m):
    t["basis"] = t["basis"][:, :40].contiguous()


@pytest.mark.parametrize("kind, alter, says", [
    ("pca", _skew, "tensor 'basis' is not an orthonormal basis"),
    ("pixel", _skew, "tensor 'basis' is not an orthonormal basis"),
    ("pca", _nan, "tensor 'mean' holds 1 non-finite value"),
    ("pca", _short, "tensor 'basis' is (48, 40), expected (48, 48)")])
def test_a_bad_linear_tokenizer_file_is_refused_at_load_naming_it(tmp_path, capsys, kind, alter, says):
    from ldae_fast.train import main

    path = _pca_file(tmp_path, alter, kind)
    code = main(_argv(tmp_path / "run", **{"engine.steps": 2, "tokenizer.path": path, "tokenizer.kind": kind}))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 4 and "Traceback" not in err, err
    assert f"tokenizer.path={path}" in last and says in last
    assert "tokenizer.kind=" not in last  # never "use the kind you already use"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_intact_tokenizer_file_still_loads(tmp_path):
    from ldae_fast.tokenizers import PCATokenizer

    res = train(_cfg(tmp_path / "run", **{"engine.steps": 2, "tokenizer.path": _pca_file(tmp_path)}))
    assert res.checkpoint is not None
    assert PCATokenizer.load(_pca_file(tmp_path, kind="pixel", name="px.safetensors")).kind == "pixel"


@pytest.mark.parametrize("kind", ["patch-ae", "patch-vae"])
def test_a_learned_tokenizer_file_with_nan_is_refused_at_load_naming_it(tmp_path, capsys, kind):
    import torch

    from ldae_fast.train import main

    D, d = 48, 16
    tensors = {"encoder": torch.randn(d, D), "decoder": torch.randn(D, d), "mean": torch.zeros(D)}
    if kind == "patch-vae":
        tensors["logvar"] = torch.zeros(d)
    tensors["decoder"][5, 2] = float("inf")
    meta = {"format_version": 1, "kind": kind, "patch_size": 4, "channels": 3, "latent_dim": d,
            "patch_dim": D, "num_patches_fitted": 1, "fit": {}}
    path = _write_tokenizer(tmp_path / f"{kind}.safetensors", tensors, meta)
    code = main(_argv(tmp_path / "run", **{"engine.steps": 2, "tokenizer.path": path, "tokenizer.kind": kind,
                                           "noise.target": "z0", "ldae.output": "latent"}))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 4 and "Traceback" not in err, err
    assert f"tokenizer.path={path}" in last and "tensor 'decoder' holds 1 non-finite value" in last
    assert not list((tmp_path / "run").glob("tokenizer*"))  # never named as the run's own output


# 8. A run that did its job exits 0: the demo's epilogue runs only where it can -------------------
def _unlabelled_shard(path: Path, n=16) -> str:
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (20, 20), (10 * i, 200 - 5 * i, 30)).save(buf, format="JPEG")
            info = tarfile.TarInfo(f"k{i:03d}.jpg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return str(path)


@pytest.mark.parametrize("val", [False, True])
def test_pretraining_on_unlabelled_user_shards_from_the_demo_preset_exits_0(tmp_path, capsys, val):
    from ldae_fast.train import main

    url = _unlabelled_shard(tmp_path / "mine-0.tar")
    extra = {"data.val_shards": url} if val else {}
    over = {**TINY, "eval.probe": "true", "eval.figure": "true", "data.epoch_size": "16", "data.num_workers": "0"}
    argv = [f"--{k}={v}" for k, v in {**over, "engine.out_dir": tmp_path / "run", "engine.steps": 2,
                                      "data.source": "wds", "data.train_shards": url, **extra}.items()]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert ck.latest_checkpoint(tmp_path / "run").name == "step_00000002"
    skipped = [ln for ln in out.splitlines() if "skipped" in ln]
    assert len(skipped) == 1, out
    assert ("has no .cls label" in skipped[0]) if val else ("data.val_shards" in skipped[0])


def test_a_non_demo_preset_on_shards_says_how_to_evaluate_instead_of_skipping_silently(tmp_path, capsys):
    from ldae_fast.train import main

    url = _unlabelled_shard(tmp_path / "mine-0.tar")
    over = {**TINY, "eval.probe": "true", "eval.figure": "true", "data.epoch_size": "16", "data.num_workers": "0"}
    argv = ["--preset", "tiny-imagenet"] + [
        f"--{k}={v}" for k, v in {**over, "engine.out_dir": tmp_path / "run", "engine.steps": 1,
                                  "data.source": "wds", "data.train_shards": url, "data.val_shards": url,
                                  "data.img_size": 16, "data.batch_size": 4}.items()]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    skipped = [ln for ln in out.splitlines() if "skipped" in ln]
    assert len(skipped) == 1 and f"ldae-fast eval --checkpoint {tmp_path / 'run'}" in skipped[0], out
    assert not (tmp_path / "run" / "results.json").exists()


# 9. One probe protocol: eval on the demo's checkpoint prints the demo's number, and says how -----
def test_eval_on_a_demo_checkpoint_reproduces_the_demos_probe_number(tmp_path, capsys):
    import re

    from ldae_fast.cli import main as cli
    from ldae_fast.device import resolve_device
    from ldae_fast.eval.features import feature_settings
    from ldae_fast.train import main

    run = tmp_path / "run"
    over = {**TINY, "eval.probe": "true", "eval.probe_epochs": "20", "data.synthetic_images": "96",
            "engine.steps": 12, "engine.out_dir": run}
    assert main([f"--{k}={v}" for k, v in over.items()]) == 0
    demo = capsys.readouterr().out
    probe, floor = (float(x) for x in re.findall(r"(?:pretrained|random-init) encoder\s+([\d.]+)%", demo))
    assert cli(["eval", "--checkpoint", str(run), "--protocols", "linear-fast", "--out", str(tmp_path / "ev")]) == 0
    capsys.readouterr()
    got = json.loads((tmp_path / "ev" / "eval.json").read_text())
    rows = {r["encoder"]: r["top1"] for r in got["rows"]}
    assert (f"{rows['checkpoint']:.1f}", f"{rows['random init']:.1f}") == (f"{probe:.1f}", f"{floor:.1f}")
    # Both outputs say what decides the number: the weights, the seed, the device and precision.
    how = feature_settings(resolve_device("auto"))
    assert "of the EMA weights" in demo and "seed 0" in demo and how in demo
    md = (tmp_path / "ev" / "eval.md").read_text()
    assert "Weights: EMA" in md and "(seed 0)" in md and how in md
    assert "centred" in demo and "raw features" in demo and "raw features" in md  # the kNN difference, named


# 12. A preset's data paths are found from the checkout, whatever the current directory -----------
def test_preset_data_paths_resolve_against_the_project_from_any_directory(tmp_path, monkeypatch):
    from ldae_fast.config import PRESETS, PROJECT_ROOT
    from ldae_fast.data.badsamples import DataError
    from ldae_fast.data.urls import expand_urls

    rel = PRESETS["tiny-imagenet"]["data.train_shards"]
    assert rel.startswith("../")
    monkeypatch.chdir(tmp_path)  # a directory with no ../shared beside it
    cfg = build_config("tiny-imagenet", {})
    assert cfg.data.train_shards == str(PROJECT_ROOT / rel)
    assert cfg.data.val_shards == str(PROJECT_ROOT / PRESETS["tiny-imagenet"]["data.val_shards"])
    if (PROJECT_ROOT / rel).parent.is_dir():  # the shared data beside the checkout: it opens
        assert len(expand_urls(cfg.data.train_shards)) == 10
    # Where neither has it, the error names the absolute path it tried under the project.
    monkeypatch.setattr("ldae_fast.config.PROJECT_ROOT", tmp_path / "checkout")
    cfg = build_config("tiny-imagenet", {})
    with pytest.raises(DataError, match=str(tmp_path / "checkout" / "..")):
        expand_urls(cfg.data.train_shards)
    # A user's own relative path stays relative to the current directory.
    assert build_config("tiny-imagenet", {"data.train_shards": "mine/x.tar"}).data.train_shards == "mine/x.tar"


def test_preset_data_paths_stay_relative_where_the_current_directory_has_them(tmp_path, monkeypatch):
    from ldae_fast.config import PRESETS

    rel = PRESETS["tiny-imagenet"]["data.train_shards"]
    work = tmp_path / "a" / "b"
    (work / Path(rel).parent).mkdir(parents=True)
    monkeypatch.chdir(work)
    assert build_config("tiny-imagenet", {}).data.train_shards == rel


def test_a_part_that_fails_on_another_rank_is_never_renamed_into_place(tmp_path):
    """Two ranks as threads: rank 1's share of the write (DeepSpeed's shards) fails; rank 0 learns
    it before the rename, both raise, and nothing half-written is left."""
    import errno
    import threading

    import torch

    barrier = threading.Barrier(2)
    flags = [False, False]

    def any_failed(rank):
        def agree(failed_here):
            flags[rank] = failed_here
            barrier.wait()
            got = any(flags)
            barrier.wait()  # nobody overwrites a flag before everyone has read it
            return got
        return agree

    def writer(rank):
        def write(tmp):
            (tmp / f"part{rank}").write_bytes(b"shard")
            if rank == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return write

    errors = {}

    def rank_main(rank):
        try:
            ck.write_checkpoint(tmp_path, 3, {"step": 3, "w": torch.ones(2)}, 2, writer=writer(rank),
                                is_main=rank == 0, barrier=barrier.wait, any_failed=any_failed(rank))
        except ck.CheckpointWriteError as e:
            errors[rank] = str(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank was left waiting"
    assert "another rank could not write its part" in errors[0] and "no space left" in errors[1]
    assert not ck.list_checkpoints(tmp_path) and not list(ck.ckpt_root(tmp_path).glob(".tmp-*"))


def test_a_checkpoint_whose_tokenizer_contradicts_its_kind_is_a_checkpoint_error(run3, tmp_path):
    import hashlib

    import torch

    from ldae_fast.eval.reader import load_for_eval

    run = _copy(run3, tmp_path / "run")
    newest = ck.latest_checkpoint(run)
    st = torch.load(newest / "state.pt", weights_only=True)
    st["method"]["tokenizer"]["tensors"]["basis"][0] *= 2  # no longer orthonormal
    torch.save(st, newest / "state.pt")
    meta = json.loads((newest / "meta.json").read_text())  # checksums that match, as an attacker's would
    meta["files"]["state.pt"] = hashlib.sha256((newest / "state.pt").read_bytes()).hexdigest()
    (newest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"{newest}: its tokenizer is damaged.*not an orthonormal basis"):
        train(_cfg(run, **{"engine.steps": 8, "engine.resume": "auto"}))
    with pytest.raises(CheckpointError, match=f"{newest}: its tokenizer is damaged"):
        load_for_eval(newest)
