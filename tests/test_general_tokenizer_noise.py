"""l-DAE on every tokenizer: the fused noise kernel with a separate decoder (the patch-wise AE /
VAE's E, G), the method's reference path for the non-linear conv VAE, and the trajectory rows
that use them training end to end (tiny, CPU, built-in synthetic data)."""

import pytest
import torch

from ldae_fast import reference
from ldae_fast.config import ConfigError, build_config
from ldae_fast.kernels import latent_noise
from ldae_fast.kernels.noise import reference_eps
from ldae_fast.methods import build_method
from ldae_fast.tokenizers import (
    ConvVAETokenizer,
    PatchAETokenizer,
    PatchVAETokenizer,
    fit_pca,
    tokenizer_from_state,
)
from ldae_fast.tokenizers.conv_vae import ConvVAE


def _linear_maps(D, d, seed=0):
    """A random encoder E (d, D) and decoder G (D, d), far from orthonormal and G != E^T."""
    g = torch.Generator().manual_seed(seed)
    E = (torch.randn(d, D, generator=g) / D**0.5 * 1.7).contiguous()
    G = (torch.randn(D, d, generator=g) / d**0.5 * 0.6).contiguous()
    return E, G


def _inputs(p, H, W, B, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    D = 3 * p * p
    x = torch.randn(B, 3, H, W, generator=g).to(dtype).to(device)
    mean = (0.1 * torch.randn(D, generator=g)).to(device)
    gamma = (0.5 + torch.rand(B, generator=g)).to(device)
    sigma = (1.5 * torch.rand(B, generator=g)).to(device)
    E, G = _linear_maps(D, d, seed)
    return x, E.to(device), G.to(device), mean, gamma, sigma


GEOMS = [(2, 6, 10, 3, 5), (4, 16, 32, 2, 8), (8, 16, 16, 2, 20)]


@pytest.mark.parametrize("p,H,W,B,d", GEOMS, ids=[f"p{g[0]}-d{g[4]}" for g in GEOMS])
def test_kernel_matches_reference_with_a_separate_decoder(kernel_device, p, H, W, B, d):
    x, E, G, mean, gamma, sigma = _inputs(p, H, W, B, d, device=kernel_device)
    out, z0, eps = latent_noise(x, E, mean, gamma, sigma, p, seed=31, offset=9, return_z0=True,
                                return_eps=True, decoder=G)
    ref_out, ref_z0 = reference.latent_noise(x, E, mean, gamma, sigma, eps, p, decoder=G)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z0, ref_z0, rtol=1e-4, atol=1e-4)
    # The decoder really is G: decoding with E^T instead gives another image.
    wrong, _ = reference.latent_noise(x, E, mean, gamma, sigma, eps, p)
    assert (wrong - out).abs().max() > 1e-2
    # Every return variant is the same draw, and the eps counters do not depend on the maps:
    # the PCA-style call (decoder None) with the same seed / offset draws the same noise.
    plain = latent_noise(x, E, mean, gamma, sigma, p, seed=31, offset=9, decoder=G)
    o1, z1 = latent_noise(x, E, mean, gamma, sigma, p, seed=31, offset=9, return_z0=True, decoder=G)
    o2, e2 = latent_noise(x, E, mean, gamma, sigma, p, seed=31, offset=9, return_eps=True, decoder=G)
    assert torch.equal(plain, out) and torch.equal(o1, out) and torch.equal(o2, out)
    assert torch.equal(z1, z0) and torch.equal(e2, eps)
    _, e_pca = latent_noise(x, E, mean, gamma, sigma, p, seed=31, offset=9, return_eps=True)
    assert torch.equal(e_pca, eps)


def test_kernel_decoder_equal_to_basis_transpose_is_the_pca_call(kernel_device):
    p, H, W, B, d = 4, 8, 12, 3, 7
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    V = q.t()[:d].float().contiguous().to(kernel_device)
    x, _, _, mean, gamma, sigma = _inputs(p, H, W, B, d, device=kernel_device)
    a = latent_noise(x, V, mean, gamma, sigma, p, seed=3, return_z0=True, return_eps=True)
    b = latent_noise(x, V, mean, gamma, sigma, p, seed=3, return_z0=True, return_eps=True, decoder=V.t())
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_kernel_bf16_with_a_separate_decoder(kernel_device):
    p, H, W, B, d = 4, 16, 16, 2, 8
    x, E, G, mean, gamma, sigma = _inputs(p, H, W, B, d, torch.bfloat16, kernel_device)
    out, eps = latent_noise(x, E, mean, gamma, sigma, p, seed=4, return_eps=True, decoder=G)
    assert out.dtype == torch.bfloat16
    true, _ = reference.latent_noise(x.double(), E.double(), mean.double(), gamma.double(), sigma.double(),
                                     eps.double(), p, decoder=G.double())
    err = (out.double() - true).abs().max().item()
    # bf16 output rounding of values of order a few units: well under 0.05.
    assert err < 0.05, err


def test_every_face_takes_the_decoder(kernel_device):
    """The launcher and the autograd.Function (torch < 2.4's op) give the custom op's output."""
    from ldae_fast.kernels.noise import LatentNoiseFunction, latent_noise_triton

    p, H, W, B, d = 4, 8, 8, 2, 6
    x, E, G, mean, gamma, sigma = _inputs(p, H, W, B, d, device=kernel_device)
    want = latent_noise(x, E, mean, gamma, sigma, p, seed=8, offset=3, return_z0=True, decoder=G)
    launcher = latent_noise_triton(x, E, mean, gamma, sigma, p, 8, 3, True, False, decoder=G)
    fn = LatentNoiseFunction.apply(x, E, mean, gamma, sigma, p, 8, 3, True, False, G)
    for got in (launcher, fn):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2].numel() == 0


def test_reference_path_with_a_separate_decoder():
    p, H, W, B, d = 4, 8, 12, 3, 7
    x, E, G, mean, gamma, sigma = _inputs(p, H, W, B, d)
    out, z0, eps = latent_noise(x, E, mean, gamma, sigma, p, seed=5, offset=0, return_z0=True,
                                return_eps=True, decoder=G, kernels="reference")
    ref_out, ref_z0 = reference.latent_noise(x, E, mean, gamma, sigma, eps, p, decoder=G)
    assert torch.equal(out, ref_out) and torch.equal(z0, ref_z0)
    assert torch.equal(eps, reference_eps(5, 0, B, 6, d, "cpu"))


def test_decoder_checks():
    p, H, W, B, d = 4, 8, 8, 2, 5
    x, E, G, mean, gamma, sigma = _inputs(p, H, W, B, d)
    for bad, exc, msg in ((G.t().contiguous(), ValueError, r"decoder must be G of shape \(D, d\) = \(48, 5\)"),
                          (G.double(), TypeError, "decoder must have dtype float32"),
                          (G[0], ValueError, "decoder must have 2 dimensions")):
        for k in ("triton", "reference"):
            with pytest.raises(exc, match=msg):
                latent_noise(x, E, mean, gamma, sigma, p, seed=1, decoder=bad, kernels=k)


# The method -----------------------------------------------------------------------------------

LATENT = {"ldae.input": "latent", "ldae.output": "latent", "noise.target": "eps",
          "noise.schedule": "linear_gamma2", "engine.kernels": "reference"}


def _patch_ae(p=4, d=8, cls=PatchAETokenizer, seed=0):
    E, G = _linear_maps(3 * p * p, d, seed)
    mean = 0.1 * torch.randn(3 * p * p, generator=torch.Generator().manual_seed(seed))
    if cls is PatchVAETokenizer:
        return cls(E, G, mean, p, d, "patch-vae", logvar=torch.full((d,), -3.0))
    return cls(E, G, mean, p, d)


def _conv_vae(p=8, d=8, seed=0):
    torch.manual_seed(seed)
    return ConvVAETokenizer(ConvVAE(d // (p // 8) ** 2, width=4).eval(), p, d, width=4)


def _images(B, size=32, seed=0):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("inp", ["latent", "image"])
def test_general_linear_method_noises_through_E_and_G(inp):
    tok = _patch_ae()
    c = build_config("demo", {**LATENT, "ldae.input": inp, "tokenizer.latent_dim": "8"})
    m = build_method(c, "cpu", tokenizer=tok)
    assert m.decoder is not None and torch.equal(m.decoder, tok.decoder)
    x = _images(3)
    nb = m.add_noise(x, step=2)
    z0 = tok.encode(x)
    torch.testing.assert_close(m.tokens(x), z0)
    zt = nb.gamma.view(-1, 1, 1) * z0 + nb.sigma.view(-1, 1, 1) * nb.target
    if inp == "latent":
        torch.testing.assert_close(nb.x_in, zt, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(nb.x_in, tok.decode(zt, 32, 32), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.to_image(zt), tok.decode(zt, 32, 32))


def test_pca_method_keeps_the_one_basis_call():
    g = torch.Generator().manual_seed(0)
    tok = fit_pca(iter([torch.randn(16, 3, 32, 32, generator=g)]), 4, 8, 16)
    m = build_method(build_config("demo", {"tokenizer.latent_dim": "8"}), "cpu", tokenizer=tok)
    assert m.decoder is None and torch.equal(m.basis, tok.basis)


def test_x0_weighted_loss_is_refused_for_a_non_orthonormal_map_and_equal_weights_train():
    tok = _patch_ae()
    over = {"tokenizer.latent_dim": "8", "engine.kernels": "reference", "noise.target": "x0"}
    with pytest.raises(ConfigError, match=r"noise.target='x0'.*tokenizer.kind='patch-ae'"):
        build_method(build_config("demo", {**over, "noise.low_weight": "1", "noise.high_weight": "0.1"}), "cpu",
                     tokenizer=tok)
    # Equal weights: the loss is high |x - x_hat|^2 per patch, whatever the basis.
    m = build_method(build_config("demo", {**over, "noise.low_weight": "0.5", "noise.high_weight": "0.5"}), "cpu",
                     tokenizer=tok)
    x, pred = _images(2), _images(2, seed=1)
    lam = torch.tensor([1.0, 2.0])
    want = (lam.view(-1, 1) * 0.5 * (reference.patchify(x, 4) - reference.patchify(pred, 4)).square().sum(-1)).mean()
    torch.testing.assert_close(m.loss(pred, x, lam), want)


def test_conv_vae_method_reference_path():
    tok = _conv_vae()
    c = build_config("demo", {**LATENT, "model.patch_size": "8", "tokenizer.latent_dim": "8"})
    m = build_method(c, "cpu", tokenizer=tok)
    assert m.basis is None
    x = _images(4)
    N, d = 16, 8
    nb = m.add_noise(x, step=3)
    z0 = tok.encode(x)
    assert nb.x_in.shape == nb.target.shape == (4, N, d)
    seed = m.cfg.engine.seed
    from ldae_fast.seeding import TAG_NOISE, derive_seed

    # eps is the reference stream on the kernel's counter layout: sample b from offset b N d.
    torch.testing.assert_close(nb.target, reference_eps(derive_seed(seed, TAG_NOISE, 3), 0, 4, N, d, "cpu"),
                               rtol=0, atol=0)
    torch.testing.assert_close(nb.x_in, nb.gamma.view(-1, 1, 1) * z0 + nb.sigma.view(-1, 1, 1) * nb.target)
    # Two micro-batches of 2 (or 2 ranks) draw what one batch of 4 draws.
    for micro in (0, 1):
        part = m.add_noise(x[2 * micro:2 * micro + 2], step=3, micro=micro, accum=2)
        assert torch.equal(part.target, nb.target[2 * micro:2 * micro + 2])
        assert torch.equal(part.x_in, nb.x_in[2 * micro:2 * micro + 2])
    r1 = build_method(c, "cpu", rank=1, world_size=2, tokenizer=tok).add_noise(x[2:], step=3)
    assert torch.equal(r1.target, nb.target[2:])
    torch.testing.assert_close(m.tokens(x), z0)
    torch.testing.assert_close(m.to_image(z0), tok.decode(z0, 32, 32))

    class Echo(torch.nn.Module):
        def forward(self, x_in, sigma=None):
            return x_in

    # Figures: the noisy tokens and the "denoised" ones, shown decoded.
    (shown_in, shown_out), = m.sample(Echo(), x, [0.5])
    assert shown_in.shape == shown_out.shape == x.shape
    # An image input goes through the tokenizer's decoder.
    ci = build_config("demo", {**LATENT, "ldae.input": "image", "model.patch_size": "8", "tokenizer.latent_dim": "8"})
    nbi = build_method(ci, "cpu", tokenizer=tok).add_noise(x, step=3)
    zt = nb.gamma.view(-1, 1, 1) * z0 + nb.sigma.view(-1, 1, 1) * nb.target
    torch.testing.assert_close(nbi.x_in, tok.decode(zt, 32, 32))


def test_conv_vae_refuses_an_image_output_before_its_fit():
    for over in ({"noise.target": "eps"}, {"noise.target": "x0"}):
        c = build_config("demo", {"tokenizer.kind": "conv-vae", "model.patch_size": "8", "tokenizer.latent_dim": "8",
                                  "ldae.output": "image", **over})
        with pytest.raises(ConfigError, match=r"tokenizer.kind='conv-vae'.*ldae.output='latent'"):
            build_method(c, "cpu")
    c = build_config("demo", {**LATENT, "ldae.output": "image", "model.patch_size": "8", "tokenizer.latent_dim": "8"})
    with pytest.raises(ConfigError, match="ldae.output"):
        build_method(c, "cpu", tokenizer=_conv_vae())


@pytest.mark.parametrize("kind", ["patch-ae", "patch-vae"])
def test_patch_ae_vae_refuse_the_weighted_x0_loss_before_their_fit(kind):
    # build_method fits nothing: a refusal here comes before the (slow) tokenizer fit.
    c = build_config("demo", {"tokenizer.kind": kind, "tokenizer.latent_dim": "8", "noise.target": "x0",
                              "noise.low_weight": "1", "noise.high_weight": "0.1"})
    with pytest.raises(ConfigError, match=rf"noise.target='x0'.*tokenizer.kind='{kind}'"):
        build_method(c, "cpu")
    # The same kind with the latent target builds (and would fit in prepare()).
    ok = build_config("demo", {**LATENT, "tokenizer.kind": kind, "tokenizer.latent_dim": "8"})
    assert build_method(ok, "cpu").tok is None


@pytest.mark.parametrize("kind", ["patch-ae", "patch-vae", "conv-vae"])
def test_method_state_round_trips_every_kind(kind, tmp_path):
    tok = {"patch-ae": _patch_ae, "patch-vae": lambda: _patch_ae(cls=PatchVAETokenizer),
           "conv-vae": _conv_vae}[kind]()
    p = 8 if kind == "conv-vae" else 4
    c = build_config("demo", {**LATENT, "model.patch_size": str(p), "tokenizer.latent_dim": "8"})
    m = build_method(c, "cpu", tokenizer=tok)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    m2 = build_method(c, "cpu")
    m2.load_state_dict(state)
    assert m2.tokenizer.kind == kind
    x = _images(2)
    a, b = m.add_noise(x, step=1), m2.add_noise(x, step=1)
    assert torch.equal(a.x_in, b.x_in) and torch.equal(a.target, b.target)
    m.export(tmp_path)
    from ldae_fast.tokenizers._io import read_tokenizer_file

    t2 = tokenizer_from_state(*read_tokenizer_file(tmp_path / "tokenizer.safetensors"))
    assert torch.equal(t2.encode(x), tok.encode(x))


# The trajectory rows, end to end ----------------------------------------------------------------

TOY = {"model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
       "data.img_size": "16", "data.batch_size": "4", "data.synthetic_images": "32", "tokenizer.fit_images": "16",
       "tokenizer.fit_steps": "30", "tokenizer.fit_patches": "512", "tokenizer.conv_steps": "4",
       "tokenizer.conv_width": "4", "tokenizer.conv_batch": "4", "engine.kernels": "reference",
       "engine.log_every": "1", "engine.deterministic": "true", "optim.ema_decay": "0", "optim.blr": "0.05"}


def _row_cfg(name, out, budget=8, **over):
    from ldae_fast.eval.ablate import row_config

    sets = {**TOY, "model.patch_size": "8" if name.startswith(("cvae", "dit")) else "4", **over}
    cfg, _ = row_config(name, "synthetic", budget, sets, out, 0.0)
    return cfg


@pytest.mark.parametrize("name", ["pae-d8", "pvae-d8", "cvae-d8", "dit-cond"])
def test_trajectory_row_trains(name, tmp_path):
    import json
    import math

    from ldae_fast.engine.loop import train

    cfg = _row_cfg(name, tmp_path)
    assert cfg.tokenizer.kind == {"pae": "patch-ae", "pvae": "patch-vae", "cvae": "conv-vae",
                                  "dit": "conv-vae"}[name.split("-")[0]]
    res = train(cfg)
    run = tmp_path / "rows" / name
    losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == cfg.engine.steps == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert res.checkpoint is not None and (run / "tokenizer.safetensors").is_file()


def test_conv_vae_row_resume_is_bit_exact(tmp_path, monkeypatch):
    """cvae-d8: 4 steps in one go == 2 steps, a crash, and a resume for the last 2."""
    from ldae_fast.engine import checkpoint as ck
    from ldae_fast.engine.loop import train
    from ldae_fast.methods.ldae import method as ldae_obj

    over = {"engine.ckpt_every": "2"}
    ref = train(_row_cfg("cvae-d8", tmp_path / "a", budget=16, **over))
    real_call = ldae_obj.LDAEMethod.__call__

    def crashing(self, model, batch, step, *a, **kw):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_call(self, model, batch, step, *a, **kw)

    monkeypatch.setattr(ldae_obj.LDAEMethod, "__call__", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(_row_cfg("cvae-d8", tmp_path / "b", budget=16, **over))
    assert ck.latest_checkpoint(tmp_path / "b" / "rows" / "cvae-d8").name == "step_00000002"
    monkeypatch.setattr(ldae_obj.LDAEMethod, "__call__", real_call)
    res = train(_row_cfg("cvae-d8", tmp_path / "b", budget=16, **over))
    a, b = ref.model.state_dict(), res.model.state_dict()
    assert ref.checkpoint.name == res.checkpoint.name == "step_00000004"
    for k in a:
        assert torch.equal(a[k], b[k]), k
