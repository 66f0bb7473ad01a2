"""The full linear probe over the stream (eval/probe_stream.py): kill -9 and rerun ends
bit-identical; 2 gloo ranks and other micro-batch splits equal one rank within float tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_step_checkpoint
from stream_harness import ENV, kill_9_once_checkpointed, kill_9_then_rerun, run_harness

HARNESS = Path(__file__).parent / "probe_harness.py"
HEAD = ("fc.weight", "fc.bias", "bn.running_mean", "bn.running_var")


def _harness(shards, out, *args):
    return run_harness(HARNESS, shards, out, *args, timeout=300)


@pytest.fixture(scope="module")
def ref(stream_shards, tmp_path_factory):
    """The uninterrupted one-rank run every other run is compared with."""
    return _harness(stream_shards, tmp_path_factory.mktemp("ref") / "ref.pt")


def test_kill_9_then_rerun_is_bit_identical(stream_shards, ref, tmp_path):
    step, res = kill_9_then_rerun(HARNESS, stream_shards, tmp_path, "probe-*.pt", limit_s=240, timeout=300)
    assert int(res["resumed"]) == step
    for k in (*HEAD, "top1"):
        assert torch.equal(res[k], ref[k]), k
    # The head moved: the comparison is not of two untrained heads.
    assert not torch.equal(ref["bn.running_var"], torch.ones_like(ref["bn.running_var"]))


def test_two_ranks_and_micro_batches_equal_one_rank(stream_shards, ref, tmp_path):
    one = ref
    two = _harness(stream_shards, tmp_path / "two.pt", "--world", "2", "--micro", "3", "--workers", "1")
    assert int(two["val"]) == int(one["val"]) == 20
    for k in HEAD:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)


def _stop_at_4_then_resume(shards, ref, tmp_path, *rest):
    """Stop a probe after 4 steps, resume it with the flags `rest`: it ends at the reference."""
    ck = tmp_path / "ck"
    part = _harness(shards, tmp_path / "part.pt", "--ckpt", str(ck), "--stop-after", "4")
    assert int(part["stopped_at"]) == 4
    res = _harness(shards, tmp_path / "rest.pt", "--ckpt", str(ck), *rest)
    assert int(res["resumed"]) == 4
    for k in HEAD:
        torch.testing.assert_close(res[k], ref[k], rtol=1e-4, atol=1e-5)


def test_resume_on_another_rank_count(stream_shards, ref, tmp_path):
    """Positions are per logical reader: a probe stopped on 1 rank continues on 2 with the same
    global batches (float sums in another order)."""
    _stop_at_4_then_resume(stream_shards, ref, tmp_path, "--world", "2")


def test_resume_with_another_micro_batch(stream_shards, ref, tmp_path):
    """The micro-batch only cuts a step into forwards: a probe resumed where G / N caps it lower
    (another rank count) continues instead of being refused."""
    _stop_at_4_then_resume(stream_shards, ref, tmp_path, "--micro", "5")


def test_checkpoint_dir_every_rank_cannot_see_is_refused_on_every_rank(stream_shards, tmp_path):
    """A --probe-dir on node-local disk: rank 0 finds its checkpoint, rank 1 (another 'node')
    none. Every rank stops with one line naming the directory, instead of rank 0 resuming at step
    4 while rank 1 starts at 0 (mismatched collectives: a hang or a wrong head)."""
    ck = tmp_path / "ck"
    part = _harness(stream_shards, tmp_path / "part.pt", "--ckpt", str(ck / "rank0"), "--stop-after", "4")
    assert int(part["stopped_at"]) == 4
    p = subprocess.run([sys.executable, str(HARNESS), str(stream_shards), str(tmp_path / "rest.pt"), "--ckpt", str(ck),
                        "--local-ckpt", "--world", "2"], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and not (tmp_path / "rest.pt").exists()
    assert "RunDirError" in p.stderr and "every node shares" in p.stderr
    # Each rank names the directory as it was given it (here its own; on a real job the same flag).
    assert f"{ck / 'rank0'}: rank(s) 1 " in p.stderr or f"{ck / 'rank1'}: rank(s) 1 " in p.stderr, p.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return one_step_checkpoint(tmp_path_factory.mktemp("probe-cli") / "run")


def _eval_cmd(ckpt, shards, out):
    # 4 steps an epoch (48 images, batch 12), 40 epochs: long enough to be killed part-way.
    return [sys.executable, "-m", "ldae_fast.cli", "eval", "--checkpoint", str(ckpt), "--data", str(shards),
            "--protocols", "linear", "--epochs", "40", "--batch-size", "12", "--readers", "4", "--micro-batch", "6",
            "--num-workers", "0", "--probe-ckpt-every", "1", "--no-baseline", "--device", "cpu", "--out", str(out)]


def test_ldae_fast_eval_linear_killed_mid_probe_then_rerun_is_bit_identical(stream_shards, tiny_checkpoint,
                                                                            tmp_path):
    """`ldae-fast eval --protocols linear` with a real (tiny) checkpoint: kill -9 mid-probe, the
    same command again resumes from the probe's checkpoint and ends where an uninterrupted run does."""
    ref_out = tmp_path / "ref"
    subprocess.run(_eval_cmd(tiny_checkpoint, stream_shards, ref_out), env=ENV, check=True, capture_output=True,
                   timeout=600)
    (ref_ck,) = (ref_out / "probe").glob("probe-*.pt")
    ref = torch.load(ref_ck, weights_only=True)
    total = int(ref["step"])
    assert total == int(ref["total_steps"]) == 160
    out = tmp_path / "cut"
    # Killed as soon as the probe has checkpointed a few steps.
    kill_9_once_checkpointed(_eval_cmd(tiny_checkpoint, stream_shards, out), out / "probe", "probe-*.pt", 3,
                             poll_s=0.02)
    (ck,) = (out / "probe").glob("probe-*.pt")
    step = int(torch.load(ck, weights_only=True)["step"])
    assert 3 <= step < total and not (out / "eval.json").exists(), f"not killed mid-probe (step {step})"
    subprocess.run(_eval_cmd(tiny_checkpoint, stream_shards, out), env=ENV, check=True, capture_output=True, timeout=600)
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
