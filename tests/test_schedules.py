import math

import pytest
import torch

from ldae_fast.methods.ldae import schedules


def test_sigma_linear_end_points():
    g, s = schedules.sigma_linear(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(g, torch.ones(3))
    torch.testing.assert_close(s, torch.tensor([0.0, math.sqrt(2) / 2, math.sqrt(2)]))
    lam = schedules.loss_weight("inv_1p_sigma2", g, s)
    torch.testing.assert_close(lam, torch.tensor([1.0, 1 / 1.5, 1 / 3.0]))


def test_ddpm_linear_beta_end_points():
    g, s = schedules.ddpm_linear_beta(torch.tensor([0.0, 1.0]), 1000)
    # t=0: one step of beta_1 = 1e-4; t=1: alpha_bar_T of the DDPM paper (~4e-5)
    torch.testing.assert_close(g[0] ** 2, torch.tensor(1 - 1e-4))
    assert 1e-5 < float(g[1] ** 2) < 1e-4
    torch.testing.assert_close(g**2 + s**2, torch.ones(2))
    g2, _ = schedules.ddpm_linear_beta(torch.linspace(0, 1, 50))
    assert bool((g2[1:] <= g2[:-1]).all())


def test_linear_gamma2_end_points():
    g, s = schedules.linear_gamma2(torch.tensor([0.0, 0.25, 1.0]))
    torch.testing.assert_close(g**2, torch.tensor([1.0, 0.75, 0.0]))
    torch.testing.assert_close(g**2 + s**2, torch.ones(3))


def test_dispatch_and_errors():
    t = torch.rand(4)
    for name in ("sigma_linear", "ddpm_linear_beta", "linear_gamma2"):
        g, s = schedules.gamma_sigma(t, name)
        assert g.shape == s.shape == (4,)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.gamma_sigma(t, "cosine")
    with pytest.raises(ValueError, match="unknown loss weight"):
        schedules.loss_weight("snr", t, t)
    assert torch.equal(schedules.loss_weight("uniform", t, t), torch.ones(4))
