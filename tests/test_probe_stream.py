"""The full linear probe over the stream (eval/probe_stream.py): kill -9 and rerun ends
bit-identical; 2 gloo ranks and other micro-batch splits equal one rank within float tolerance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from eval_shards import write_split

HARNESS = Path(__file__).parent / "probe_harness.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-shards")
    write_split(root, "train", 4, 12, size=24, seed=0)
    write_split(root, "val", 1, 20, size=24, seed=1)
    return root


@pytest.fixture(scope="module")
def ref(shards, tmp_path_factory):
    """The uninterrupted one-rank run every other run is compared with."""
    return _harness(shards, tmp_path_factory.mktemp("ref") / "ref.pt")


def _harness(shards, out, *args):
    p = subprocess.run([sys.executable, str(HARNESS), str(shards), str(out), *args], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"harness {' '.join(args)} exited {p.returncode}:\n{p.stderr[-4000:]}"
    return torch.load(out, weights_only=True)


def test_kill_9_then_rerun_is_bit_identical(shards, ref, tmp_path):
    ck = tmp_path / "ck"
    p = subprocess.Popen([sys.executable, str(HARNESS), str(shards), str(tmp_path / "cut.pt"), "--ckpt", str(ck),
                          "--sleep", "0.5"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    state = None
    while time.monotonic() - t0 < 240:
        found = list(ck.glob("probe-*.pt"))
        if found and int(torch.load(found[0], weights_only=True)["step"]) >= 3:
            state = found[0]
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = int(torch.load(state, weights_only=True)["step"])
    assert 3 <= step < 9 and not (tmp_path / "cut.pt").exists(), "killed mid-run"
    res = _harness(shards, tmp_path / "cut.pt", "--ckpt", str(ck))
    assert int(res["resumed"]) == step
    for k in ("fc.weight", "fc.bias", "bn.running_mean", "bn.running_var", "top1"):
        assert torch.equal(res[k], ref[k]), k
    # The head moved: the comparison is not of two untrained heads.
    assert not torch.equal(ref["bn.running_var"], torch.ones_like(ref["bn.running_var"]))


def test_two_ranks_and_micro_batches_equal_one_rank(shards, ref, tmp_path):
    one = ref
    two = _harness(shards, tmp_path / "two.pt", "--world", "2", "--micro", "3", "--workers", "1")
    assert int(two["val"]) == int(one["val"]) == 20
    for k in ("fc.weight", "fc.bias", "bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)


def test_resume_on_another_rank_count(shards, ref, tmp_path):
    """Positions are per logical reader: a probe stopped on 1 rank continues on 2 with the same
    global batches (float sums in another order)."""
    ck = tmp_path / "ck"
    part = _harness(shards, tmp_path / "part.pt", "--ckpt", str(ck), "--stop-after", "4")
    assert int(part["stopped_at"]) == 4
    res = _harness(shards, tmp_path / "rest.pt", "--ckpt", str(ck), "--world", "2")
    assert int(res["resumed"]) == 4
    for k in ("fc.weight", "fc.bias", "bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(res[k], ref[k], rtol=1e-4, atol=1e-5)


def test_resume_with_another_micro_batch(shards, ref, tmp_path):
    """The micro-batch only cuts a step into forwards: a probe resumed where G / N caps it lower
    (another rank count) continues instead of being refused."""
    ck = tmp_path / "ck"
    part = _harness(shards, tmp_path / "part.pt", "--ckpt", str(ck), "--stop-after", "4")
    assert int(part["stopped_at"]) == 4
    res = _harness(shards, tmp_path / "rest.pt", "--ckpt", str(ck), "--micro", "5")
    assert int(res["resumed"]) == 4
    for k in ("fc.weight", "fc.bias", "bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(res[k], ref[k], rtol=1e-4, atol=1e-5)


def test_checkpoint_dir_every_rank_cannot_see_is_refused_on_every_rank(shards, tmp_path):
    """A --probe-dir on node-local disk: rank 0 finds its checkpoint, rank 1 (another 'node')
    none. Every rank stops with one line naming the directory, instead of rank 0 resuming at step
    4 while rank 1 starts at 0 (mismatched collectives: a hang or a wrong head)."""
    ck = tmp_path / "ck"
    part = _harness(shards, tmp_path / "part.pt", "--ckpt", str(ck / "rank0"), "--stop-after", "4")
    assert int(part["stopped_at"]) == 4
    p = subprocess.run([sys.executable, str(HARNESS), str(shards), str(tmp_path / "rest.pt"), "--ckpt", str(ck),
                        "--local-ckpt", "--world", "2"], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and not (tmp_path / "rest.pt").exists()
    assert "RunDirError" in p.stderr and "every node shares" in p.stderr
    # Each rank names the directory as it was given it (here its own; on a real job the same flag).
    assert f"{ck / 'rank0'}: rank(s) 1 " in p.stderr or f"{ck / 'rank1'}: rank(s) 1 " in p.stderr, p.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from ldae_fast.config import build_config
    from ldae_fast.engine import loop

    root = tmp_path_factory.mktemp("probe-cli")
    over = {"model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1",
            "model.decoder_depth": "1", "data.img_size": "16", "model.patch_size": "4",
            "data.batch_size": "8", "data.synthetic_images": "32", "tokenizer.fit_images": "16",
            "engine.kernels": "reference", "engine.steps": "1", "engine.progress": "false",
            "eval.probe": "false", "eval.figure": "false", "engine.out_dir": str(root / "run")}
    return loop.train(build_config("demo", over)).checkpoint


def _eval_cmd(ckpt, shards, out):
    # 4 steps an epoch (48 images, batch 12), 40 epochs: long enough to be killed part-way.
    return [sys.executable, "-m", "ldae_fast.cli", "eval", "--checkpoint", str(ckpt), "--data", str(shards),
            "--protocols", "linear", "--epochs", "40", "--batch-size", "12", "--readers", "4", "--micro-batch", "6",
            "--num-workers", "0", "--probe-ckpt-every", "1", "--no-baseline", "--device", "cpu", "--out", str(out)]


def test_ldae_fast_eval_linear_killed_mid_probe_then_rerun_is_bit_identical(shards, tiny_checkpoint, tmp_path):
    """`ldae-fast eval --protocols linear` with a real (tiny) checkpoint: kill -9 mid-probe, the
    same command again resumes from the probe's checkpoint and ends where an uninterrupted run does."""
    ref_out = tmp_path / "ref"
    subprocess.run(_eval_cmd(tiny_checkpoint, shards, ref_out), env=ENV, check=True, capture_output=True,
                   timeout=600)
    (ref_ck,) = (ref_out / "probe").glob("probe-*.pt")
    ref = torch.load(ref_ck, weights_only=True)
    total = int(ref["step"])
    assert total == int(ref["total_steps"]) == 160
    out = tmp_path / "cut"
    p = subprocess.Popen(_eval_cmd(tiny_checkpoint, shards, out), env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    step = 0
    while p.poll() is None:  # kill as soon as the probe has checkpointed a few steps
        found = list((out / "probe").glob("probe-*.pt")) if (out / "probe").exists() else []
        if found:
            try:
                step = int(torch.load(found[0], weights_only=True)["step"])
            except (RuntimeError, OSError, EOFError):
                step = 0
            if step >= 3:
                break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    (ck,) = (out / "probe").glob("probe-*.pt")
    step = int(torch.load(ck, weights_only=True)["step"])
    assert 3 <= step < total and not (out / "eval.json").exists(), f"not killed mid-probe (step {step})"
    subprocess.run(_eval_cmd(tiny_checkpoint, shards, out), env=ENV, check=True, capture_output=True, timeout=600)
    got = torch.load(ck, weights_only=True)
    assert int(got["step"]) == total
    for k, v in ref["head"].items():
        assert torch.equal(got["head"][k], v), k
    for a, b in zip(ref["opt"]["state"].values(), got["opt"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    (row,) = [r for r in json.loads((out / "eval.json").read_text())["rows"] if r["encoder"] == "checkpoint"]
    (ref_row,) = [r for r in json.loads((ref_out / "eval.json").read_text())["rows"] if r["encoder"] == "checkpoint"]
    assert row["resumed_from"] == step and ref_row["resumed_from"] == 0
    assert (row["top1"], row["top5"]) == (ref_row["top1"], ref_row["top5"])
    assert not torch.equal(ref["head"]["bn.running_var"], torch.ones_like(ref["head"]["bn.running_var"]))
