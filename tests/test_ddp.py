"""engine.backend=ddp on 2 CPU ranks (gloo), launched with torchrun as a user would.

The 2-rank run is compared with a single-process run of the same global batch and seed: the
objective draws noise per global-batch row and the synthetic stream hands rank r global batch
b * world + r, so with augmentation off both see the same inputs and only the reduction order of
the gradients differs. The launches are shared by the tests (a module fixture).
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from ldae_fast.config import build_config
from ldae_fast.engine import checkpoint as ck
from ldae_fast.engine.preempt import MARKER, PREEMPTED_EXIT

ROOT = Path(__file__).resolve().parent.parent

# micro 2 x accumulation 2 x 2 ranks = global batch 8; the single run: micro 4 x accumulation 2.
TINY = {
    "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
    "data.img_size": "16", "data.synthetic_images": "64", "tokenizer.fit_images": "32",
    "engine.kernels": "reference", "engine.log_every": "1", "engine.progress": "false", "optim.blr": "1e-3",
    "optim.warmup_epochs": "0.5", "eval.probe": "false", "eval.figure": "false", "optim.ema_decay": "0.9",
    "data.crop_min_scale": "1", "data.hflip": "false", "engine.steps": "6", "engine.ckpt_every": "3",
    "engine.grad_accum": "2", "engine.deterministic": "true",
}
DDP = {"data.batch_size": "2", "engine.backend": "ddp"}


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.pop("LDAE_DEBUG", None)
    return env


def torchrun(out: Path, over: dict, entry: str = "train.py", env: dict | None = None,
             nnodes: int = 1) -> subprocess.CompletedProcess:
    args = [f"--{k}={v}" for k, v in {**TINY, **DDP, **over, "engine.out_dir": str(out)}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(ROOT / entry), *args]
    # Generous: guards a hang only (two ranks share two loaded cores).
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=600)


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, f"{p.args}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-5000:]}"


def metrics(out: Path) -> dict[int, float]:
    """step -> loss; a resumed run appends, and its later lines win."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def final_state(out: Path) -> dict:
    return ck.load_state(ck.latest_checkpoint(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from ldae_fast.engine.loop import train

    root = tmp_path_factory.mktemp("ddp")
    train(build_config("demo", {**TINY, "data.batch_size": "4", "engine.out_dir": str(root / "single")}))
    _ok(torchrun(root / "ddp", {}))
    # Only rank 1 gets SIGUSR1, during step 1 (0-based): both ranks finish step 2 and checkpoint it.
    sig = torchrun(root / "pre", {}, entry="tests/ddp_signal_entry.py",
                   env=_env(LDAE_TEST_SIGNAL_RANK="1", LDAE_TEST_SIGNAL_STEP="1", LDAE_TEST_SIGNAL="SIGUSR1"))
    (root / "pre.log").write_text(f"{sig.returncode}\n{sig.stdout}\n{sig.stderr}")
    shutil.copytree(root / "pre", root / "pre_copy")
    _ok(torchrun(root / "pre", {"engine.resume": "auto"}))
    # 2 ranks -> 1 process (micro 4 x accumulation 2, the same global batch 8), preempted after
    # step 4 -> 2 ranks again, to the end.
    shutil.copytree(root / "pre_copy", root / "moved")
    import signal

    from ldae_fast.engine.loop import SingleDevice
    from ldae_fast.engine.preempt import Preempted

    real, calls = SingleDevice.backward, []

    def backward(self, loss):
        if len(calls) == 2:  # the first micro-batch of step 3 (0-based): stop after step 4
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(1)
        return real(self, loss)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SingleDevice, "backward", backward)
        with pytest.raises(Preempted, match="stopped at step 4 of 6"):
            train(build_config("demo", {**TINY, "data.batch_size": "4", "engine.resume": "auto",
                                        "engine.out_dir": str(root / "moved")}))
    _ok(torchrun(root / "moved", {"engine.resume": "auto"}))
    return root


@pytest.mark.slow
def test_ddp_two_ranks_match_single_process(runs):
    ref, got = metrics(runs / "single"), metrics(runs / "ddp")
    assert sorted(ref) == sorted(got) == list(range(1, 7))
    for s in ref:
        assert math.isfinite(got[s]) and got[s] == pytest.approx(ref[s], rel=1e-4), (s, ref, got)
    a, b = final_state(runs / "single"), final_state(runs / "ddp")
    assert b["world_size"] == 2 and len(b["data_ranks"]) == 2
    for part in ("model", "ema"):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=1e-3, atol=1e-5, msg=f"{part}.{k}")
    # The same checkpoint format as one device: the full optimizer state, Adam moments included.
    assert set(a["optimizer"]["state"]) == set(b["optimizer"]["state"])


@pytest.mark.slow
def test_ddp_signal_to_one_rank_stops_both_at_the_same_step_and_resumes_exactly(runs):
    log = (runs / "pre.log").read_text()
    code = int(log.split("\n", 1)[0])
    # torchrun exits 1 when a rank exits non-zero, and shows the first rank's own code, 10.
    assert code == 1 and f"exitcode  : {PREEMPTED_EXIT}" in log, log[-3000:]
    # Rank 0 (its log is stdout) did not get the signal, yet stopped after the same step.
    assert "stopped at step 2 of 6 (another rank received a stop signal)" in log, log[-3000:]
    assert "train.py: preempted: stopped at step 2 of 6" in log, log[-3000:]
    # The marker a requeue script under torchrun reads; gone once the run resumed.
    assert json.loads((runs / "pre_copy" / MARKER).read_text())["step"] == 2
    assert not (runs / "pre" / MARKER).exists()
    assert ck.latest_checkpoint(runs / "pre_copy").name == "step_00000002"
    a, b = final_state(runs / "ddp"), final_state(runs / "pre")
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    assert metrics(runs / "ddp") == metrics(runs / "pre")


@pytest.mark.slow
def test_two_ranks_to_one_and_back_continue_the_run(runs):
    """2 ranks (micro 2 x accumulation 2) -> 1 process (micro 4 x 2) -> 2 ranks: every leg keeps
    the global batch, so samples, rows and noise per step are the uninterrupted run's and the
    weights agree up to the order of the gradient sums."""
    ref, got = metrics(runs / "ddp"), metrics(runs / "moved")
    assert sorted(ref) == sorted(got) == list(range(1, 7))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-4), (s, ref, got)
    a, b = final_state(runs / "ddp"), final_state(runs / "moved")
    assert b["step"] == 6 and b["world_size"] == 2
    for part in ("model", "ema"):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=1e-3, atol=1e-5, msg=f"{part}.{k}")
    # The data position went 2 ranks -> 1 -> 2 without repeating or skipping: 6 steps x 8 images.
    assert [d["consumed"] for d in b["data_ranks"]] == [48, 48] and b["data"]["epoch"] == 0


def multinode_cmd(port: int, out: Path) -> list[str]:
    """One "node" of README's multi-node launch line, with 1 rank per node on this machine."""
    args = [f"--{k}={v}" for k, v in {**TINY, **DDP, "engine.out_dir": str(out)}.items()]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ldae-test",
            str(ROOT / "train.py"), *args]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_match_single_process(runs, tmp_path):
    """README's multi-node line, as two "nodes" of one rank each on localhost."""
    port = free_port()
    nodes = [subprocess.Popen(multinode_cmd(port, tmp_path / "run"), cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]  # generous: guards a hang only
    assert [n.returncode for n in nodes] == [0, 0], "\n---\n".join(o[-3000:] for o in outs)
    ref, got = metrics(runs / "single"), metrics(tmp_path / "run")
    assert sorted(ref) == sorted(got) == list(range(1, 7))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-4), (s, ref, got)
    assert final_state(tmp_path / "run")["world_size"] == 2


def test_no_sync_all_reduces_once_per_optimizer_step(tmp_path, monkeypatch):
    """A one-rank DDP world in this process: with accumulation 3 the gradient buckets are
    all-reduced in the third micro-batch's backward only."""
    import torch.distributed as dist

    from ldae_fast.engine.ddp_backend import DDPBackend
    from ldae_fast.engine.loop import train

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    calls: list[int] = []
    real_init = DDPBackend.__init__

    def init(self, cfg, model, lr):
        real_init(self, cfg, model, lr)

        def hook(state, bucket):
            calls.append(len(micro_seen))
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        self.model.register_comm_hook(None, hook)

    micro_seen: list[bool] = []
    real_micro = DDPBackend.micro_step

    def micro_step(self, last):
        micro_seen.append(last)
        return real_micro(self, last)

    monkeypatch.setattr(DDPBackend, "__init__", init)
    monkeypatch.setattr(DDPBackend, "micro_step", micro_step)
    try:
        over = {**TINY, "data.batch_size": "4", "engine.grad_accum": "3", "engine.steps": "2",
                "engine.ckpt_every": "0", "engine.backend": "ddp", "engine.out_dir": str(tmp_path / "run")}
        train(build_config("demo", over), backend_factory=DDPBackend)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert micro_seen == [False, False, True] * 2
    # Every bucket's all-reduce happened while the third micro-batch (index 2, 5) was running.
    assert calls and set(calls) == {3, 6}, calls
