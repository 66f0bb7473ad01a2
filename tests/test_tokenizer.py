import pytest
import torch
from conftest import in_batches as _batches
from conftest import smooth_images as _images

from ldae_fast import reference
from ldae_fast.tokenizers import PCATokenizer, PixelTokenizer, TokenizerMismatch, fit_pca


@pytest.fixture(scope="module")
def tok():
    return fit_pca(_batches(_images(256)), patch_size=4, latent_dim=8, max_images=256)


def test_basis_orthonormal_sorted(tok):
    V = tok.basis_full.double()
    torch.testing.assert_close(V @ V.t(), torch.eye(48, dtype=torch.float64), atol=1e-5, rtol=0)
    ev = tok.eigenvalues
    assert bool((ev[1:] <= ev[:-1] + 1e-6).all())
    assert tok.num_patches_fitted == 256 * 16


def test_matches_direct_covariance(tok):
    t = reference.patchify(_images(256), 4).reshape(-1, 48).double()
    cov = torch.cov(t.t())
    ev = torch.linalg.eigvalsh(cov).flip(0)
    torch.testing.assert_close(tok.eigenvalues.double(), ev.clamp_min(0), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(tok.mean.double(), t.mean(0), rtol=1e-4, atol=1e-6)


def test_reconstruction_error_falls_with_d(tok):
    x = _images(32, seed=1)
    errs = []
    for d in (1, 4, 8, 16, 32, 48):
        t = PCATokenizer(tok.basis_full, tok.mean, tok.eigenvalues, 4, d)
        rec = t.decode(t.encode(x), 16, 16)
        errs.append(float((rec - x).square().mean()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-9


def test_fit_is_deterministic():
    a = fit_pca(_batches(_images(64)), 4, 8, 64)
    b = fit_pca(_batches(_images(64), bs=7), 4, 8, 64)
    torch.testing.assert_close(a.basis_full, b.basis_full, atol=1e-4, rtol=0)


def test_save_load_and_refusals(tok, tmp_path):
    path = tok.save(tmp_path / "pca.safetensors")
    assert (tmp_path / "pca.json").exists()
    back = PCATokenizer.load(path, patch_size=4, latent_dim=8, kind="pca")
    assert torch.equal(back.basis_full, tok.basis_full) and back.d == 8
    assert back.metadata()["explained_variance_at_d"] == pytest.approx(tok.metadata()["explained_variance_at_d"])
    with pytest.raises(TokenizerMismatch, match="patch_size=4 but the config asks for model.patch_size=8"):
        PCATokenizer.load(path, patch_size=8)
    with pytest.raises(TokenizerMismatch, match="latent_dim=8"):
        PCATokenizer.load(path, latent_dim=16)
    with pytest.raises(FileNotFoundError, match="fit-pca"):
        PCATokenizer.load(tmp_path / "missing.safetensors")


def test_pixel_tokenizer_is_identity():
    t = PixelTokenizer.create(2)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(t.decode(t.encode(x), 4, 4), x)


def test_registry_round_trip_and_linear_maps():
    from ldae_fast.config import build_config
    from ldae_fast.tokenizers import TOKENIZERS, Tokenizer, prepare_tokenizer, tokenizer_from_state

    assert set(TOKENIZERS) >= {"pca", "pixel"}
    cfg = build_config("demo", {"tokenizer.fit_images": "64", "tokenizer.latent_dim": "8"})
    tok = prepare_tokenizer(cfg, lambda: _batches(_images(64)), log=lambda _: None)
    assert isinstance(tok, Tokenizer) and tok.kind == "pca" and tok.d == 8
    E, G = tok.linear_maps()
    assert E.shape == (8, tok.D) and G.shape == (tok.D, 8)
    x = _images(4)
    z = tok.encode(x)
    torch.testing.assert_close(z, (reference.patchify(x, 4) - tok.mean) @ E.t())
    back = tokenizer_from_state(tok.state_dict(), tok.metadata())
    assert type(back) is PCATokenizer and torch.equal(back.basis, tok.basis)

    pix = prepare_tokenizer(build_config("demo", {"tokenizer.kind": "pixel", "tokenizer.latent_dim": "48"}),
                            lambda: iter(()), log=lambda _: None)
    assert type(tokenizer_from_state(pix.state_dict(), pix.metadata())) is PixelTokenizer
    torch.testing.assert_close(pix.decode(pix.encode(x), 16, 16), x)
