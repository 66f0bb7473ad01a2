"""The per-step tail both streaming eval runs share (eval/step_tail.py): a non-finite loss is the
project's exit-3 error naming the step; checkpoints fall every N steps, at the last step and where
`stop_after` leaves; the loop is left at the last step or after `stop_after` steps of this call."""

from __future__ import annotations

import math

import pytest

from ldae_fast.engine.guard import NonFiniteLoss
from ldae_fast.eval.step_tail import StepTail


def _tail(saves, steps_seen, lines, **kw):
    args = dict(desc="linear", what="probe", hint="lower --blr", total=7, steps_per_epoch=2, global_batch=8,
                step0=0, main=True, save=lambda step, pos: saves.append((step, pos)), ckpt_every=3,
                log=lines.append, on_step=steps_seen.append, stop_after=0, t_start=0.0)
    args.update(kw)
    return StepTail(**args)


def test_non_finite_loss_is_the_exit_3_error_naming_the_step():
    saves: list = []
    tail = _tail(saves, [], [])
    assert not tail.end(0, {0: (0, 8)}, 2.3, 0.1)
    with pytest.raises(NonFiniteLoss, match=r"linear: the probe's loss is nan at step 2; lower --blr") as e:
        tail.end(1, {0: (0, 16)}, math.nan, 0.1)
    assert e.value.exit_code == 3
    assert saves == [], "no checkpoint of a non-finite step"


def test_checkpoints_every_n_and_at_the_end_then_leaves():
    saves, seen, lines = [], [], []
    tail = _tail(saves, seen, lines)
    left = [tail.end(s, {0: (0, s)}, 1.0, 0.1) for s in range(7)]
    assert left == [False] * 6 + [True]
    assert [s for s, _ in saves] == [3, 6, 7] and saves[-1][1] == {0: (0, 6)}
    assert seen == list(range(1, 8)) and tail.stopped is None
    assert lines[-1].startswith("linear: step 7/7 (epoch 3.50) loss 1.0000 lr 0.1, ")
    assert "img/s, ETA 0.0 min" in lines[-1]


def test_stop_after_checkpoints_off_cadence_and_reports_where_it_stopped():
    saves: list = []
    tail = _tail(saves, [], [], step0=3, stop_after=2, log=None)
    assert not tail.end(3, {}, 1.0, 0.1)
    assert tail.end(4, {1: (0, 4)}, 1.0, 0.1)
    assert [s for s, _ in saves] == [5], "step 5 is off the every-3 cadence: saved to resume from"
    assert tail.stopped["stopped_at"] == 5 and tail.stopped["resumed_from"] == 3 and tail.stopped["steps"] == 7


def test_last_step_wins_over_stop_after_and_no_save_without_checkpoints():
    tail = _tail([], [], [], stop_after=7, save=None)
    assert [tail.end(s, {}, 1.0, 0.1) for s in range(7)][-1] and tail.stopped is None


def test_in_memory_probe_that_diverges_is_the_same_exit_3_error():
    """The in-memory probe (demo, learn_check) ends on a non-finite loss with the same error as the
    streaming one: exit 3 through the CLI, and still a FloatingPointError for the learning-rate
    sweep of bench/learn_check.py, which skips a diverged lr."""
    import torch

    from ldae_fast.eval.linear_probe import train_head_cached

    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(32, 8, generator=g), torch.arange(32) % 4
    feats[5, 3] = float("inf")
    with pytest.raises(NonFiniteLoss, match=r"the probe's loss is nan; lower --blr") as e:
        train_head_cached(feats, labels, feats[:8].clone(), labels[:8], epochs=1, batch_size=16)
    assert e.value.exit_code == 3 and isinstance(e.value, FloatingPointError)
