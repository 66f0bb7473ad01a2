"""The one learning-rate schedule (ldae_fast/lr_schedule.py) in its three users' forms."""

import pytest
import torch

from ldae_fast.lr_schedule import lr_at_step, warmup_cosine
from ldae_fast.tokenizers import _io


def test_warmup_cosine_by_epoch():
    assert warmup_cosine(0, 1.0, 10, 90) == 0
    assert warmup_cosine(5, 1.0, 10, 90) == pytest.approx(0.5)
    assert warmup_cosine(10, 1.0, 10, 90) == pytest.approx(1.0)
    assert warmup_cosine(50, 1.0, 10, 90) == pytest.approx(0.5)
    assert warmup_cosine(90, 1.0, 10, 90) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(200, 1.0, 10, 90, min_lr=0.01) == pytest.approx(0.01)


def test_lr_at_step():
    assert lr_at_step(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at_step(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at_step(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at_step(55, 1.0, 10, 100) == pytest.approx(0.5)
    assert lr_at_step(100, 1.0, 10, 100, min_lr=0.01) == pytest.approx(0.01)
    # No decay span left after the warm-up: the step after it is at min_lr, not a division by 0.
    assert lr_at_step(10, 1.0, 10, 10) == pytest.approx(1.0)
    assert lr_at_step(11, 1.0, 10, 10, min_lr=0.01) == pytest.approx(0.01)


def test_tokenizer_fit_schedule_warms_up_over_5_percent():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    lrs = []
    for step in range(100):
        _io.set_fit_lr(opt, 2.0, step, 100)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(2.0 / 5) and lrs[4] == pytest.approx(2.0) and lrs[5] == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and 0 < lrs[-1] < 1e-2
