"""The learned tokenizers of l-DAE Table 2 (patch-wise AE / VAE, conv VAE): they fit, they beat a
map of the same shape that was not fitted, they save and load exactly, and a run trains with one."""

import math

import pytest
import torch
from conftest import in_batches as _batches
from conftest import smooth_images as _images

from ldae_fast import reference
from ldae_fast.config import build_config
from ldae_fast.tokenizers import (
    TOKENIZERS,
    ConvVAETokenizer,
    PatchAETokenizer,
    PatchVAETokenizer,
    Tokenizer,
    fit_pca,
    prepare_tokenizer,
    tokenizer_from_state,
)
from ldae_fast.tokenizers.conv_vae import ConvVAE, fit_conv_vae
from ldae_fast.tokenizers.patch_ae import fit_patch_ae
from ldae_fast.tokenizers.patch_vae import fit_patch_vae

FAST = {"max_patches": 4096, "steps": 300, "lr": 1e-2, "batch": 256, "seed": 0}


def _mse(tok, x):
    return float((tok.decode(tok.encode(x), x.shape[2], x.shape[3]) - x).square().mean())


def _random_linear_like(tok, seed=1):
    """A random orthonormal map of the fitted one's shape, with the same mean patch."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(tok.D, tok.d, generator=g))
    return PatchAETokenizer(q.t().contiguous(), q.contiguous(), tok.mean, tok.patch_size, tok.d)


@pytest.fixture(scope="module")
def fitted():
    x = _images(128)
    ae = fit_patch_ae(_batches(x), 4, 8, max_images=128, **FAST)
    vae = fit_patch_vae(_batches(x), 4, 8, beta=0.01, max_images=128, **FAST)
    # Enough images that the conv net cannot memorise them in its few steps (64 it does).
    conv = fit_conv_vae(_batches(_images(512, seed=3)), 8, 8, max_images=512, steps=300, lr=3e-3, batch=16,
                        beta=0.01, width=16, adv_weight=0.0, seed=0)
    return {"patch-ae": ae, "patch-vae": vae, "conv-vae": conv}


def test_each_kind_is_a_tokenizer_in_the_registry(fitted):
    for kind, tok in fitted.items():
        assert kind in TOKENIZERS and tok.kind == kind and isinstance(tok, Tokenizer)
        z = tok.encode(_images(2, seed=3))
        assert z.shape == (2, 4 if kind == "conv-vae" else 16, tok.d)
    assert fitted["conv-vae"].linear_maps() is None
    for kind in ("patch-ae", "patch-vae"):
        E, G = fitted[kind].linear_maps()
        assert E.shape == (8, 48) and G.shape == (48, 8)
        x = _images(2, seed=3)
        torch.testing.assert_close(fitted[kind].encode(x), (reference.patchify(x, 4) - fitted[kind].mean) @ E.t())


@pytest.mark.parametrize("kind", ["patch-ae", "patch-vae"])
def test_linear_fit_beats_a_random_map_and_nears_pca(fitted, kind):
    held_out = _images(32, seed=7)
    tok = fitted[kind]
    fit, rand = _mse(tok, held_out), _mse(_random_linear_like(tok), held_out)
    pca = _mse(fit_pca(_batches(_images(128)), 4, 8, 128), held_out)
    assert fit < 0.5 * rand, (fit, rand)
    # PCA is the best rank-d linear reconstruction: a fitted linear AE can only approach it.
    assert pca <= fit * 1.001 and fit < 1.5 * pca, (fit, pca)


def test_conv_vae_beats_its_untrained_self(fitted):
    held_out = _images(16, seed=7)
    tok = fitted["conv-vae"]
    torch.manual_seed(123)
    untrained = ConvVAETokenizer(ConvVAE(tok.latent_channels, tok.width).eval(), tok.patch_size, tok.d, tok.width)
    assert _mse(tok, held_out) < 0.8 * _mse(untrained, held_out)
    assert tok.fit["recon_mse"] > 0 and tok.fit["kl"] > 0


def test_conv_vae_adversarial_term_changes_the_fit_and_is_not_saved():
    kw = {"max_images": 32, "steps": 6, "lr": 3e-3, "batch": 8, "beta": 0.01, "width": 4, "seed": 0}
    plain = fit_conv_vae(_batches(_images(32)), 8, 8, adv_weight=0.0, **kw)
    adv = fit_conv_vae(_batches(_images(32)), 8, 8, adv_weight=0.5, **kw)
    assert adv.fit["adv_weight"] == 0.5 and math.isfinite(adv.fit["recon_mse"])
    assert adv.state_dict().keys() == plain.state_dict().keys()
    assert all(k.startswith(("encoder.", "decoder.")) for k in adv.state_dict())
    # The same seed and data: only the discriminator's term (its second half) tells them apart.
    assert not torch.equal(adv.state_dict()["decoder.0.weight"], plain.state_dict()["decoder.0.weight"])


def test_ae_recovers_a_d_dim_subspace_like_pca():
    g = torch.Generator().manual_seed(0)
    d, D, n = 6, 48, 256
    A = torch.randn(D, d, generator=g) @ torch.diag(torch.linspace(1.0, 3.0, d))
    tokens = 0.3 + torch.randn(n, 16, d, generator=g) @ A.t()
    x = reference.unpatchify(tokens, 4, 16, 16, 3)
    ae = fit_patch_ae(_batches(x), 4, d, max_images=n, max_patches=8192, steps=800, lr=1e-2, batch=512, seed=0)
    pca = fit_pca(_batches(x), 4, d, n)
    var = float(x.var())
    assert _mse(pca, x) < 1e-6 * var
    assert _mse(ae, x) < 1e-3 * var, (_mse(ae, x), var)
    # A rank-d map that was not fitted leaves most of the variance out.
    assert _mse(_random_linear_like(ae), x) > 0.5 * var


def test_vae_reports_kl_and_it_falls_with_beta():
    x = _images(64)
    kls = []
    for beta in (0.001, 1.0):
        tok = fit_patch_vae(_batches(x), 4, 8, beta=beta, max_images=64, **FAST)
        meta = tok.metadata()
        assert meta["fit"]["beta"] == beta and math.isfinite(meta["fit"]["kl"])
        kls.append(meta["fit"]["kl"])
    assert kls[1] < 0.7 * kls[0], kls


def test_fit_is_deterministic_given_the_seed():
    x = _images(32)
    kw = {**FAST, "steps": 30}
    a = fit_patch_ae(_batches(x), 4, 8, max_images=32, **kw)
    b = fit_patch_ae(_batches(x, bs=5), 4, 8, max_images=32, **kw)
    c = fit_patch_ae(_batches(x), 4, 8, max_images=32, **{**kw, "seed": 1})
    assert torch.equal(a.encoder, b.encoder) and torch.equal(a.decoder, b.decoder)
    assert not torch.equal(a.encoder, c.encoder)


@pytest.mark.parametrize("kind", ["patch-ae", "patch-vae", "conv-vae"])
def test_save_load_round_trip_is_bit_exact(fitted, kind, tmp_path):
    tok = fitted[kind]
    x = _images(3, seed=5)
    # Through a file (any kind, named by its metadata) ...
    path = tok.save(tmp_path / f"{kind}.safetensors")
    assert path.with_suffix(".json").is_file()
    p = tok.patch_size
    cfg = build_config("demo", {"model.patch_size": str(p), "data.img_size": "16", "tokenizer.latent_dim": "8",
                                "tokenizer.path": str(path)})
    back = prepare_tokenizer(cfg, lambda: iter(()), log=lambda _: None)
    assert type(back) is type(tok) and back.metadata() == tok.metadata()
    # ... and through a checkpoint: tensors and plain containers, loaded with weights_only=True.
    torch.save({"tensors": tok.state_dict(), "meta": tok.metadata()}, tmp_path / "state.pt")
    st = torch.load(tmp_path / "state.pt", weights_only=True)
    again = tokenizer_from_state(st["tensors"], st["meta"])
    for other in (back, again):
        sd = other.state_dict()
        assert sd.keys() == tok.state_dict().keys()
        assert all(torch.equal(sd[k], v) for k, v in tok.state_dict().items())
        assert torch.equal(other.encode(x), tok.encode(x))
        assert torch.equal(other.decode(tok.encode(x), 16, 16), tok.decode(tok.encode(x), 16, 16))


def test_tokenizer_path_refuses_another_latent_dim(fitted, tmp_path):
    from ldae_fast.config import ConfigError

    path = fitted["patch-ae"].save(tmp_path / "ae.safetensors")
    cfg = build_config("demo", {"data.img_size": "16", "tokenizer.latent_dim": "16", "tokenizer.path": str(path)})
    with pytest.raises(ConfigError, match="latent_dim=8 but the config asks for tokenizer.latent_dim=16"):
        prepare_tokenizer(cfg, lambda: iter(()), log=lambda _: None)


def test_conv_vae_names_the_fields_it_cannot_honour():
    from ldae_fast.config import ConfigError

    for over, msg in (({"model.patch_size": "4"}, "model.patch_size=4 must be a multiple of 8"),
                      ({"model.patch_size": "16", "tokenizer.latent_dim": "6"}, "multiple of 4")):
        cfg = build_config("demo", {"tokenizer.kind": "conv-vae", **over})
        with pytest.raises(ConfigError, match=msg):
            prepare_tokenizer(cfg, lambda: iter(()), log=lambda _: None)
    with pytest.raises(ConfigError, match="tokenizer.beta"):
        build_config("demo", {"tokenizer.beta": "-1"})
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        build_config("demo", {"tokenizer.kind": "vqgan"})


FIT = ["--tokenizer.fit_images=16", "--data.synthetic_images=32", "--data.batch_size=8", "--data.img_size=16"]


def test_fit_tokenizer_cli_writes_each_kind(tmp_path, monkeypatch, capsys):
    from ldae_fast import cli
    from ldae_fast.tokenizers._io import read_tokenizer_file

    monkeypatch.chdir(tmp_path)
    runs = {"patch-ae": ["--tokenizer.fit_steps=20"], "patch-vae": ["--tokenizer.fit_steps=20"],
            "conv-vae": ["--model.patch_size=8", "--tokenizer.conv_steps=3", "--tokenizer.conv_width=4",
                         "--tokenizer.adversarial=true"]}
    for kind, extra in runs.items():
        assert cli.main(["fit-tokenizer", "--kind", kind, *FIT, *extra, f"--out={kind}.safetensors"]) == 0
        tensors, meta = read_tokenizer_file(tmp_path / f"{kind}.safetensors")
        assert kind != "conv-vae" or meta["fit"]["adv_weight"] == 0.1
        classes = {"patch-ae": PatchAETokenizer, "patch-vae": PatchVAETokenizer, "conv-vae": ConvVAETokenizer}
        assert meta["kind"] == kind and type(tokenizer_from_state(tensors, meta)) is classes[kind]
    assert "saved patch-vae.safetensors" in capsys.readouterr().out
    assert cli.main(["fit-tokenizer", "--kind=patch-ae", *FIT, "--tokenizer.fit_steps=5"]) == 0
    assert (tmp_path / "runs" / "fit-patch-ae" / "demo-p4-d16-n16.safetensors").is_file()
    assert cli.main(["fit-pca", *FIT, "--out", "pca.safetensors"]) == 0
    assert read_tokenizer_file(tmp_path / "pca.safetensors")[1]["kind"] == "pca"
    capsys.readouterr()
    assert cli.main(["fit-tokenizer", "--kind", "vqgan", *FIT]) == 2
    assert "--kind 'vqgan'" in capsys.readouterr().err
    assert cli.main(["fit-tokenizer", "--kind", "conv-vae", *FIT]) == 2
    assert "model.patch_size=4 must be a multiple of 8" in capsys.readouterr().err
