import pytest
import torch

from ldae_fast.config import build_config
from ldae_fast.kernels.dispatch import resolve_kernels
from ldae_fast.methods.ldae.method import LDAEMethod
from ldae_fast.seeding import derive_seed
from ldae_fast.tokenizers import fit_pca


def _setup(**over):
    cfg = build_config("demo", {"engine.kernels": "reference", **over})
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(64, 3, 32, 32, generator=g)
    tok = fit_pca(iter([imgs]), cfg.model.patch_size, cfg.tokenizer.latent_dim, 64)
    return cfg, tok, imgs[:8]


def test_resolve_kernels(monkeypatch):
    assert resolve_kernels("reference", "cpu") == "reference"
    assert resolve_kernels("auto", "cpu") == "reference"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_kernels("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernels("triton", "cpu") == "triton"


def test_noise_is_keyed_on_step():
    cfg, tok, x = _setup()
    obj = LDAEMethod(cfg, "cpu", tokenizer=tok)
    a, b, c = obj.add_noise(x, 5), obj.add_noise(x, 5), obj.add_noise(x, 6)
    assert torch.equal(a.x_in, b.x_in) and torch.equal(a.sigma, b.sigma)
    assert not torch.equal(a.x_in, c.x_in)
    assert derive_seed(0, 1) != derive_seed(0, 2) != derive_seed(1, 1) != derive_seed(1, 0)
    # final recipe: sigma in [0, sqrt 2], lambda = 1 / (1 + sigma^2)
    assert float(a.sigma.max()) <= 2 ** 0.5 and float(a.sigma.min()) >= 0
    torch.testing.assert_close(a.lam, 1 / (1 + a.sigma**2))


def test_noise_lives_in_the_latent_space():
    cfg, tok, x = _setup()
    obj = LDAEMethod(cfg, "cpu", tokenizer=tok)
    t = torch.zeros(len(x))
    clean = obj.add_noise(x, 0, t=t).x_in
    noisy = obj.add_noise(x, 0, t=torch.ones(len(x))).x_in
    # outside span(V_d) the noisy and the sigma=0 input agree: the noise touched only d components
    d = tok.d
    rest = tok.basis_full[d:]
    from ldae_fast.reference import patchify
    diff = (patchify(noisy, 4) - patchify(clean, 4)) @ rest.t()
    assert float(diff.abs().max()) < 1e-4
    lat = (patchify(noisy, 4) - patchify(clean, 4)) @ tok.basis.t()
    assert abs(float(lat.std()) - 2 ** 0.5) < 0.1


def test_perfect_prediction_has_zero_loss_and_errors_are_weighted():
    cfg, tok, x = _setup()
    obj = LDAEMethod(cfg, "cpu", tokenizer=tok)
    lam = torch.ones(len(x))
    assert float(obj.loss(x, x, lam)) == 0.0
    # an error inside span(V_d) costs 10x the same-sized error outside it (w = 1 vs 0.1)
    from ldae_fast.reference import unpatchify
    inside = unpatchify(tok.basis_full[0].expand(1, 64, 48).clone(), 4, 32, 32)
    outside = unpatchify(tok.basis_full[-1].expand(1, 64, 48).clone(), 4, 32, 32)
    r = float(obj.loss(x[:1] + inside, x[:1], lam[:1])) / float(obj.loss(x[:1] + outside, x[:1], lam[:1]))
    assert r == pytest.approx(10.0, rel=1e-3)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("world", [1, 2])
def test_noise_is_keyed_on_the_row_of_the_global_batch(world, kernels):
    """Micro-batch m of A on rank r draws rows (m * world + r) * B of the step's global batch: the
    same noise per row as one process with the whole global batch, however the batch is split."""
    from ldae_fast.kernels import triton_available

    if kernels == "triton" and not triton_available("cpu"):
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1")
    cfg = build_config("demo", {"engine.kernels": kernels})
    tok = fit_pca(iter([torch.randn(16, 3, 32, 32)]), cfg.model.patch_size, cfg.tokenizer.latent_dim, 16)
    x = torch.randn(8, 3, 32, 32)
    whole = LDAEMethod(cfg, "cpu", tokenizer=tok).add_noise(x, 7)
    B, accum = 8 // (2 * world), 2
    for micro in range(accum):
        for rank in range(world):
            rows = slice((micro * world + rank) * B, (micro * world + rank + 1) * B)
            part = LDAEMethod(cfg, "cpu", rank=rank, world_size=world, tokenizer=tok).add_noise(
                x[rows], 7, micro=micro, accum=accum)
            torch.testing.assert_close(part.x_in, whole.x_in[rows])
            torch.testing.assert_close(part.sigma, whole.sigma[rows])
    with pytest.raises(ValueError, match="micro=2 must lie in"):
        LDAEMethod(cfg, "cpu", tokenizer=tok).add_noise(x, 7, micro=2, accum=2)
