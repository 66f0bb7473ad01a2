"""The DeepSpeed backend on 2 CPU ranks (gloo), launched as the user would: torchrun and deepspeed.

Every sharded run is compared against a single-process run with the same global batch and seed:
the objective draws noise per global-batch row and the synthetic stream hands rank r global batch
b * world + r, so with augmentation switched off (crop scale 1, no flip) the two see identical
inputs and only the reduction order of the gradients differs. The launches are shared by the tests
(module fixtures), which keeps the file within a few launches' time.

A launch is bounded by its progress, not by a wall-clock budget: it fails when it prints nothing
for IDLE_LIMIT_S seconds (a hung rendezvous or collective), however long a loaded machine takes
to import, compile DeepSpeed's CPU all-reduce extension (first launch only) and train. Two ranks
on a 2-core machine at load 8 spend minutes on that, so a fixed total limit either flakes there
or waits far too long for a real hang.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port

from ldae_fast.config import build_config

deepspeed = pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# The TINY run of test_engine.py at micro-batch 4 with nothing random in the augmentation.
TINY = {
    "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
    "data.img_size": "16", "data.synthetic_images": "64", "tokenizer.fit_images": "32",
    "engine.kernels": "reference", "engine.log_every": "1", "engine.progress": "false", "optim.blr": "1e-3",
    "optim.warmup_epochs": "0.5", "eval.probe": "false", "eval.figure": "false",
    "data.crop_min_scale": "1", "data.hflip": "false", "engine.steps": "6", "engine.ckpt_every": "3",
}
# Sharded runs: micro-batch B per rank, 2 ranks. Single runs: micro-batch 2B, 1 process.
Z1 = {"data.batch_size": "4", "engine.zero_stage": "1"}
Z2 = {"data.batch_size": "4", "engine.zero_stage": "2"}
Z3 = {"data.batch_size": "2", "engine.grad_accum": "2", "engine.zero_stage": "3", "model.grad_checkpointing": "true"}


def _env() -> dict:
    env = dict(os.environ)  # TORCH_EXTENSIONS_DIR included: tests/conftest.py sets one per checkout
    # DeepSpeed would find the CPU itself, after probing for CUDA and warning about it.
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two shared cores
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _args(over: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in over.items()]


# Silence that counts as a hang: far above any quiet phase of a launch (the ranks' imports, the
# PCA fit) even on a loaded machine. LDAE_TEST_IDLE_LIMIT_S overrides it.
IDLE_LIMIT_S = float(os.environ.get("LDAE_TEST_IDLE_LIMIT_S", "900"))


def run_until_idle(cmd: list[str], idle_limit_s: float = IDLE_LIMIT_S, **kw) -> tuple[int, str]:
    """Run `cmd` (its own process group), merging stdout and stderr; -> (exit code, output).
    Kill the group and fail when it prints nothing for `idle_limit_s` seconds."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, **kw)
    out: list[str] = []
    last = [time.monotonic()]

    def pump() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            out.append(line)
            last[0] = time.monotonic()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while p.poll() is None:
        if time.monotonic() - last[0] > idle_limit_s:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            reader.join(5)
            pytest.fail(f"{' '.join(cmd)}: no output for {idle_limit_s:.0f} s (hung?)\n{''.join(out)[-6000:]}")
        time.sleep(0.5)
    reader.join()
    return p.returncode, "".join(out)


def launch(launcher: str, out: Path, over: dict, backend: str | None = "deepspeed") -> None:
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:
        exe = BIN / "deepspeed"
        if not exe.exists():
            pytest.skip("the deepspeed launcher script is not installed next to this python")
        # Through this interpreter: the script's shebang may name another path of the same venv,
        # whose ranks would rebuild DeepSpeed's CPU extension for this one's flags in turn.
        cmd = [sys.executable, str(exe), "--num_gpus", "2", "--master_port", port]
    cmd += [str(ROOT / "train.py"), *_args({**TINY, **over, **({"engine.backend": backend} if backend else {}),
                                             "engine.out_dir": str(out)})]
    rc, text = run_until_idle(cmd, cwd=ROOT, env=_env())
    assert rc == 0, f"{' '.join(cmd)}\n--- output\n{text[-8000:]}"


def metrics(out: Path) -> dict[int, float]:
    """step -> loss; a resumed run appends, and its later lines win."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def single_run(out: Path, batch: int, grad_accum: int = 1):
    from ldae_fast.engine.loop import train

    over = {**TINY, "data.batch_size": str(batch), "engine.grad_accum": str(grad_accum), "engine.out_dir": str(out)}
    return train(build_config("demo", over))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    single_run(root / "single8", 8)
    single_run(root / "single4x2", 4, grad_accum=2)
    launch("torchrun", root / "z1", Z1)
    launch("torchrun", root / "z2", Z2)
    launch("torchrun", root / "z3", Z3)
    return root


def _assert_same_curve(ref: dict, got: dict) -> None:
    assert sorted(ref) == sorted(got) == list(range(1, 7))
    for s in ref:
        assert math.isfinite(got[s])
        assert got[s] == pytest.approx(ref[s], rel=1e-4), (s, ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["z1", "z2"])
def test_zero12_two_ranks_match_single_process(runs, run):
    _assert_same_curve(metrics(runs / "single8"), metrics(runs / run))
    cfg = json.loads((runs / run / "config.json").read_text())
    assert cfg["engine"]["backend"] == "deepspeed" and cfg["engine"]["zero_stage"] == int(run[1])


@pytest.mark.slow
def test_zero3_grad_accum_activation_ckpt_matches_single_process(runs):
    # micro 2 x accumulation 2 x 2 ranks == micro 4 x accumulation 2 x 1 process, draw for draw.
    _assert_same_curve(metrics(runs / "single4x2"), metrics(runs / "z3"))
    lrs = [json.loads(line)["lr"] for line in (runs / "z3" / "metrics.jsonl").read_text().splitlines()]
    assert max(lrs) == pytest.approx(1e-3 * 8 / 256)  # blr x global batch / 256, after warm-up


@pytest.mark.slow
def test_deepspeed_checkpoint_resumes_and_continues(runs, tmp_path):
    # A run stopped after its step-3 checkpoint, resumed under the other launcher.
    src, out = runs / "z2", tmp_path / "z2"
    shutil.copytree(src, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    lines = (out / "metrics.jsonl").read_text().splitlines()[:3]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert (out / "checkpoints" / "step_00000003" / "ds" / "state").is_dir()
    launch("deepspeed", out, {**Z2, "engine.resume": "auto"})
    _assert_same_curve(metrics(src), metrics(out))
    a = torch.load(src / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    b = torch.load(out / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    for k in a["ema"]:
        torch.testing.assert_close(b["ema"][k], a["ema"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert b["step"] == 6 and len(b["data_ranks"]) == 2


@pytest.mark.slow
def test_export_from_zero3_checkpoint_loads_in_timm(runs, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    from ldae_fast.engine.deepspeed_backend import consolidated_model_state
    from ldae_fast.eval.export import _meta, main

    # ZeRO-3's state.pt holds the weights gathered from the partitions (engine/zero_state.py):
    # the fp32 masters DeepSpeed's own consolidation reads from its sharded files.
    # (its EMA, kept sharded, is gathered too: test_zero3_ema_is_kept_saved_and_resumed)
    ckpt = runs / "z3" / "checkpoints" / "step_00000006"
    st = torch.load(ckpt / "state.pt", weights_only=True)
    shards = consolidated_model_state(ckpt)
    assert shards.keys() <= st["model"].keys()
    for k, v in shards.items():
        assert torch.equal(st["model"][k], v), k
    assert main([str(runs / "z3"), str(tmp_path / "z3"), "--no-ema"]) == 0
    assert main([str(runs / "single4x2"), str(tmp_path / "ref"), "--no-ema"]) == 0
    got, ref = load_file(str(tmp_path / "z3" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    kwargs = json.loads(_meta(tmp_path / "z3" / "model.safetensors")["timm_kwargs"])
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
    vit.load_state_dict(got, strict=True)


@pytest.mark.slow
def test_zero3_ema_is_kept_saved_and_resumed(runs, tmp_path):
    """Under ZeRO-3 each rank averages its own partition; the checkpoint holds the gathered EMA,
    equal to the single-process run's, and a resume cuts the partitions back out of it."""
    single = torch.load(runs / "single4x2" / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    z3 = torch.load(runs / "z3" / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert z3["ema"] is not None and z3["ema"].keys() == single["ema"].keys() and z3["ema_updates"] == 6
    # Tolerances well below the EMA's distance from the weights (~1e-5 here): not vacuous.
    assert max((single["ema"][k] - single["model"][k]).abs().max() for k in single["ema"]) > 1e-6
    for k, v in single["ema"].items():
        torch.testing.assert_close(z3["ema"][k], v, rtol=1e-5, atol=2e-7, msg=k)
    src, out = runs / "z3", tmp_path / "z3"
    shutil.copytree(src, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    lines = (out / "metrics.jsonl").read_text().splitlines()[:3]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    launch("torchrun", out, {**Z3, "engine.resume": "auto"})
    _assert_same_curve(metrics(src), metrics(out))
    b = torch.load(out / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    for k, v in z3["ema"].items():
        torch.testing.assert_close(b["ema"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def _cut_after_step_3(src: Path, out: Path) -> Path:
    """A copy of run `src` as if stopped after its step-3 checkpoint."""
    shutil.copytree(src, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    lines = (out / "metrics.jsonl").read_text().splitlines()[:3]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return out


def _assert_same_final_state(ref: Path, got: Path, parts=("model", "ema")) -> None:
    a = torch.load(ref / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    b = torch.load(got / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert b["step"] == 6
    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=1e-4, atol=1e-6, msg=f"{part}.{k}")


@pytest.mark.slow
@pytest.mark.parametrize("run", ["z2", "z3"])
def test_zero_checkpoint_of_two_ranks_continues_on_one_device(runs, tmp_path, run):
    """ZeRO-2 / ZeRO-3 on 2 ranks -> engine.backend=single, 1 process, the same global batch 8:
    the gathered model, Adam moments and step continue the run (the uninterrupted one's curve and
    weights), without DeepSpeed in the resumed process."""
    from ldae_fast.engine.loop import train

    out = _cut_after_step_3(runs / run, tmp_path / run)
    res = train(build_config("demo", {**TINY, "data.batch_size": "8", "engine.out_dir": str(out),
                                      "engine.resume": "auto"}))
    assert res.steps == 6
    _assert_same_curve(metrics(runs / run), metrics(out))
    _assert_same_final_state(runs / run, out)
    st = torch.load(out / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)
    assert set(st["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(st["optimizer"]["state"][0]["step"]) == 3


@pytest.mark.slow
def test_ddp_checkpoint_continues_under_zero1_and_single_under_zero3(runs, tmp_path):
    """A ddp run's checkpoint (2 ranks) resumed by DeepSpeed ZeRO-1 on 2 ranks, and a single-device
    one by ZeRO-3 on 2 ranks: the whole state is cut into the partitions and the run continues."""
    ddp = tmp_path / "ddp"
    launch("torchrun", ddp, {**Z1, "engine.backend": "ddp"}, backend=None)
    _assert_same_curve(metrics(runs / "single8"), metrics(ddp))
    z1 = _cut_after_step_3(ddp, tmp_path / "ddp_z1")
    launch("torchrun", z1, {**Z1, "engine.resume": "auto"})
    _assert_same_curve(metrics(ddp), metrics(z1))
    _assert_same_final_state(ddp, z1, parts=("model",))
    z3 = _cut_after_step_3(runs / "single4x2", tmp_path / "single_z3")
    launch("torchrun", z3, {**Z3, "engine.resume": "auto"})
    _assert_same_curve(metrics(runs / "single4x2"), metrics(z3))
    _assert_same_final_state(runs / "single4x2", z3, parts=("model",))


def hostfile_node_cmd(hostfile: Path, node_rank: int, port: int, out: Path, over: dict) -> list[str]:
    """One node's line of README's DeepSpeed hostfile launch without ssh (every node runs it with
    its own --node_rank; the hostfile lists the nodes and their slots, i.e. ranks)."""
    return [sys.executable, str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "train.py"),
            *_args({**TINY, **over, "engine.backend": "deepspeed", "engine.out_dir": str(out)})]


def test_readme_hostfile_line_is_the_tested_one(tmp_path):
    """The flags of README's no-ssh hostfile line are those the two-node test launches with."""
    text = (ROOT / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("deepspeed --hostfile hostfile --no_ssh"))
    readme_flags = {w for w in line.split() if w.startswith("--") and "." not in w}
    cmd = hostfile_node_cmd(tmp_path / "hostfile", 0, 29500, tmp_path, {})
    tested = {w for w in cmd[:cmd.index(str(ROOT / "train.py"))] if w.startswith("--")}
    assert readme_flags == tested == {"--hostfile", "--no_ssh", "--node_rank", "--master_addr", "--master_port"}


@pytest.mark.slow
def test_two_nodes_from_a_hostfile_match_single_process(runs, tmp_path):
    """DeepSpeed's hostfile launch as two one-rank "nodes" on localhost (--no_ssh: each node starts
    its own launcher, as on a cluster without passwordless ssh), ZeRO-2, against one process."""
    if not (BIN / "deepspeed").exists():
        pytest.skip("the deepspeed launcher script is not installed next to this python")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    out = tmp_path / "run"
    log = open(tmp_path / "node1.log", "w")
    node1 = subprocess.Popen(hostfile_node_cmd(hostfile, 1, port, out, Z2), cwd=ROOT, env=_env(),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc, text = run_until_idle(hostfile_node_cmd(hostfile, 0, port, out, Z2), cwd=ROOT, env=_env())
        node1.wait(timeout=IDLE_LIMIT_S)  # node 0 is done: node 1 finishes its last step at most
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
        log.close()
    assert (rc, node1.returncode) == (0, 0), f"{text[-6000:]}\n--- node 1\n{(tmp_path / 'node1.log').read_text()[-4000:]}"
    _assert_same_curve(metrics(runs / "single8"), metrics(out))
    assert json.loads((out / "config.json").read_text())["engine"]["backend"] == "deepspeed"
    st = torch.load(out / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert st["world_size"] == 2 and len(st["data_ranks"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("run", ["z1", "z3"])
def test_deepspeed_accumulates_gradients_in_fp32(runs, run):
    """Read back from the checkpoint DeepSpeed wrote: the config it ran with states fp32
    gradient accumulation (DeepSpeed's default would follow the bf16 weights on a GPU)."""
    from ldae_fast.engine.checkpoint import weights_only_loads
    from ldae_fast.engine.deepspeed_backend import _ds_safe_globals

    f = sorted((runs / run / "checkpoints" / "step_00000006" / "ds" / "state").glob("*model_states.pt"))[0]
    with weights_only_loads(_ds_safe_globals()):
        st = torch.load(f, weights_only=True)
    assert st["ds_config"]["data_types"]["grad_accum_dtype"] == "fp32"
    assert st["ds_config"]["gradient_accumulation_steps"] == int(({"z1": Z1, "z3": Z3}[run]).get("engine.grad_accum", 1))


def test_ranks_read_disjoint_samples():
    from ldae_fast.data import build_train_stream

    cfg = build_config("demo", {**TINY, "data.batch_size": "4"})
    whole = build_config("demo", {**TINY, "data.batch_size": "8"})
    r0, r1 = build_train_stream(cfg, 0, 2), build_train_stream(cfg, 1, 2)
    one = build_train_stream(whole, 0, 1)
    seen0, seen1 = [], []
    for _ in range(r0.batches_per_epoch):  # one epoch: 64 images / (4 x 2)
        (a, _), (b, _), (c, _) = next(r0), next(r1), next(one)
        # The two ranks' micro-batches are the halves of the one process's global batch.
        assert torch.equal(torch.cat([a, b]), c)
        seen0 += [x.flatten() for x in a]
        seen1 += [x.flatten() for x in b]
    s0, s1 = torch.stack(seen0), torch.stack(seen1)
    assert not (torch.cdist(s0, s1) == 0).any()  # no image on both ranks
    assert len(s0) + len(s1) == 64


def test_ds_config_batch_semantics_and_override(tmp_path):
    from ldae_fast.engine.deepspeed_backend import ds_config

    cfg = build_config("demo", {**TINY, "data.batch_size": "4", "engine.grad_accum": "3", "engine.zero_stage": "3",
                                "optim.clip_grad": "1.5"})
    c = ds_config(cfg, world_size=2, on_cuda=False)
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (4, 3, 24)
    assert cfg.lr(2) == pytest.approx(1e-3 * 24 / 256)
    assert c["zero_optimization"]["stage"] == 3 and c["gradient_clipping"] == 1.5
    assert c["bf16"]["enabled"] is False  # bf16 only with CUDA
    assert ds_config(cfg, 2, on_cuda=True)["bf16"]["enabled"] is True
    assert "optimizer" not in c and "scheduler" not in c  # ours, set per step

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "bf16": {"enabled": False},
                                "train_batch_size": 24}))
    cfg.engine.deepspeed_config = str(user)
    c = ds_config(cfg, world_size=2, on_cuda=True)
    # Merged key by key: the user's value wins, our other keys of the same section stay.
    assert c["zero_optimization"] == {**ds_config_no_user(cfg), "reduce_bucket_size": 123}
    assert c["bf16"]["enabled"] is False

    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ValueError, match="data.batch_size"):
        ds_config(cfg, world_size=2, on_cuda=False)
    user.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(ValueError, match="engine.zero_stage"):
        ds_config(cfg, world_size=2, on_cuda=False)
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="optimizer"):
        ds_config(cfg, world_size=2, on_cuda=False)
    cfg.engine.deepspeed_config = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError):
        ds_config(cfg, world_size=2, on_cuda=False)


def ds_config_no_user(cfg) -> dict:
    from ldae_fast.engine.deepspeed_backend import ds_config

    saved, cfg.engine.deepspeed_config = cfg.engine.deepspeed_config, ""
    try:
        return ds_config(cfg, world_size=2, on_cuda=True)["zero_optimization"]
    finally:
        cfg.engine.deepspeed_config = saved


def test_a_silent_launch_is_killed_as_hung(tmp_path):
    marker = tmp_path / "still-running"
    code = f"import time; print('started', flush=True); time.sleep(600); open({str(marker)!r}, 'w')"
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"no output for 2 s \(hung\?\)[\s\S]*started"):
        run_until_idle([sys.executable, "-c", code], idle_limit_s=2)
    assert time.monotonic() - t0 < 300 and not marker.exists()
