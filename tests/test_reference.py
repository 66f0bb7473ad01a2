import math

import pytest
import torch

from ldae_fast import reference


@pytest.mark.parametrize("p,H,W", [(2, 8, 8), (4, 16, 8), (14, 28, 28), (16, 32, 16)])
def test_patchify_roundtrip_and_order(p, H, W):
    x = torch.randn(3, 3, H, W)
    t = reference.patchify(x, p)
    assert t.shape == (3, (H // p) * (W // p), 3 * p * p)
    assert torch.equal(reference.unpatchify(t, p, H, W), x)
    # MAE order: token n = row-major patch index, inside a patch (row, col, channel).
    n, i, j, c = 1, p - 1, 0, 2
    hp, wp = divmod(n, W // p)
    assert t[0, n, (i * p + j) * 3 + c] == x[0, c, hp * p + i, wp * p + j]


def test_patchify_rejects_indivisible():
    with pytest.raises(ValueError, match="not divisible"):
        reference.patchify(torch.zeros(1, 3, 10, 10), 4)


def _orthonormal(D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return q.t().contiguous().float()


@pytest.mark.parametrize("d", [1, 5, 48])
@pytest.mark.parametrize("low,high", [(1.0, 0.1), (1.0, 1.0), (0.5, 2.0)])
def test_loss_full_and_fast_agree(d, low, high):
    p, B = 4, 3
    V = _orthonormal(3 * p * p)
    pred, target = torch.randn(B, 3, 8, 12), torch.randn(B, 3, 8, 12)
    lam = torch.rand(B)
    full = reference.pca_loss_full(pred, target, V, lam, d, p, low, high)
    fast = reference.pca_loss_fast(pred, target, V[:d], lam, p, low, high)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


def test_loss_is_weighted_mse_for_identity_basis():
    p = 2
    V = torch.eye(12)
    pred, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    lam = torch.tensor([1.0, 0.5])
    got = reference.pca_loss_fast(pred, target, V[:12], lam, p, 1.0, 1.0)
    per_sample = (target - pred).square().sum(dim=(1, 2, 3)) / 4  # N = 4 tokens
    assert torch.allclose(got, (lam * per_sample).mean())


def test_latent_noise_zero_sigma_is_projection():
    p, d = 4, 6
    V = _orthonormal(48)[:d]
    mu = torch.randn(48)
    x = torch.randn(2, 3, 8, 8)
    eps = torch.randn(2, 4, d)
    out, z0 = reference.latent_noise(x, V, mu, torch.ones(2), torch.zeros(2), eps, p)
    proj = reference.unpatchify((reference.patchify(x, p) - mu) @ V.t() @ V + mu, p, 8, 8)
    torch.testing.assert_close(out, proj)
    # noise lives only in span(V_d): its latent is sigma * eps
    out2, _ = reference.latent_noise(x, V, mu, torch.ones(2), torch.full((2,), 0.5), eps, p)
    dz = (reference.patchify(out2, p) - reference.patchify(out, p)) @ V.t()
    torch.testing.assert_close(dz, 0.5 * eps, rtol=1e-4, atol=1e-5)


def test_attention_matches_explicit_softmax():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    out = reference.attention(q, k, v)
    w = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(8))
    w = w / w.sum(-1, keepdim=True)
    torch.testing.assert_close(out, w @ v)
