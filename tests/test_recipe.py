"""The paper's recipe (l-DAE App. A, Tables 1-3) as the presets hold it, and the pieces it needs:
center crops, the trajectory table, the probe's t / input / depth, class conditioning."""

import math

import pytest
import torch

from ldae_fast.config import PRESETS, ConfigError, build_config
from ldae_fast.methods.ldae import schedules, trajectory
from ldae_fast.tokenizers import TOKENIZERS

PAPER = ("ldae-vitb", "ldae-vithalfl", "ldae-vitl")


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_are_the_papers(name):
    c = build_config(name)
    assert c.tokenizer.kind == "pca" and c.tokenizer.latent_dim == 32 and c.model.patch_size == 16
    assert (c.optim.beta1, c.optim.beta2) == (0.9, 0.999)
    assert c.eval.probe_t == 10 and c.noise.num_timesteps == 1000 and c.eval.probe_input == "clean"
    assert c.eval.probe_batch_size == 16384 and c.eval.probe_blr == 0.1
    assert c.data.crop == "random_resized"  # the final entry of the trajectory


def test_finetune_recipe_is_the_papers():
    from ldae_fast.eval.finetune import recipe_for

    class Enc(torch.nn.Module):
        def __init__(self, depth):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(depth))

    b, l_ = recipe_for(Enc(12)), recipe_for(Enc(24))
    for r in (b, l_):
        assert r.batch_size == 1024 and r.blr * r.batch_size / 256 == pytest.approx(4e-3)
        assert (r.weight_decay, r.drop_path, r.epochs, r.mixup, r.cutmix, r.ema_decay) == (
            0.05, 0.1, 100, 0.8, 1.0, 0.9999)
        assert r.rand_augment.startswith("rand-m9-mstd0.5")
    assert (b.layer_decay, l_.layer_decay) == (0.85, 0.65)


def test_center_crop_is_the_centred_square_and_unflipped():
    from ldae_fast.data.transforms import sample_crop_box

    c = build_config("demo", {"data.crop": "center"})
    assert c.data.crop_min_scale == 1.0 and c.data.hflip is False
    box = sample_crop_box(300, 200, (c.data.crop_min_scale, 1.0))
    assert (box.left, box.top, box.width, box.height) == (50, 0, 200, 200)
    box = sample_crop_box(64, 64, (1.0, 1.0))
    assert (box.left, box.top, box.width, box.height) == (0, 0, 64, 64)
    # Random crops still vary.
    g = torch.Generator().manual_seed(0)
    boxes = {tuple(sample_crop_box(64, 64, (0.2, 1.0), gen=g)) for _ in range(5)}
    assert len(boxes) > 1


def test_center_crop_stream_is_the_eval_images():
    from ldae_fast.data import build_eval_arrays, build_train_stream

    c = build_config("demo", {"data.crop": "center", "data.synthetic_images": "64", "data.batch_size": "64"})
    imgs, _ = next(iter(build_train_stream(c)))
    ref, _ = build_eval_arrays(c, "train")
    # The stream shuffles: every streamed image is one of the un-augmented ones (up to the uint8
    # rounding of the crop), far closer to it than the images are to each other.
    d = torch.cdist(imgs.flatten(1), ref.flatten(1)).min(1).values
    apart = torch.cdist(ref.flatten(1), ref.flatten(1)) + 1e9 * torch.eye(ref.shape[0])
    assert float(d.max()) < 0.1 < float(apart.min())
    rand = build_config("demo", {"data.synthetic_images": "64", "data.batch_size": "64"})
    imgs_r, _ = next(iter(build_train_stream(rand)))
    assert float(torch.cdist(imgs_r.flatten(1), ref.flatten(1)).min(1).values.max()) > 0.1


def test_tokenizer_fit_config_is_unaugmented():
    from ldae_fast.tokenizers import fit_config

    c = build_config("demo")
    assert c.data.hflip and c.data.crop == "random_resized"
    f = fit_config(c)
    assert f.data.crop == "center" and not f.data.hflip and f.data.crop_min_scale == 1.0
    assert f.model == c.model and f.tokenizer == c.tokenizer


def test_schedules_single_level_and_gamma2():
    t = torch.tensor([0.0, 0.3, 1.0])
    g, s = schedules.gamma_sigma(t, "single_level", single_sigma=1 / 3)
    torch.testing.assert_close(g, torch.ones(3))
    torch.testing.assert_close(s, torch.full((3,), 1 / 3))
    g, s = schedules.linear_gamma2(t)
    torch.testing.assert_close(schedules.loss_weight("gamma2", g, s), 1 - t)


def test_trajectory_rows_chain_one_change_each():
    rows = trajectory.ROWS
    assert rows["pca-d32"].paper_acc == 65.1 and rows["pca-d128"].paper_acc == 53.9
    assert rows["random-crop"].paper_acc == 65.0 and rows["single-level"].paper_acc == 61.5
    for r in rows.values():
        assert r.parent is None or r.parent in rows, r.name
        assert r.name in PRESETS
    full = trajectory.row_overrides("random-crop")
    assert full["data.crop"] == "random_resized"
    assert trajectory.row_overrides("predict-x0-w")["data.crop"] == "center"
    # Only the named change differs from the parent (beyond inherited keys).
    a, b = trajectory.row_overrides("remove-input-scaling"), trajectory.row_overrides("lambda-gamma2")
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {"noise.schedule", "noise.loss_weight"}
    # The paper's input scaling is the schedule's gamma_t; our divisor option is never set by a row.
    assert not any(build_config(r).noise.input_scaling for r in trajectory.ROWS)
    assert "tokenizer.adversarial" not in trajectory.row_overrides("pca-d32")


# The tokenizer width d per token and patch size each row of the paper runs at (../shared/PAPERS.md):
# Table 1 at DiT's 32x32x4 latent of a 256 px image, 16 dims per 2x2 token (its last row, 63.4, is
# Table 2's conv-VAE d = 16 entry); Table 2 at the d its column names; Fig. 5 pixels at 3 p^2;
# Table 3 and after from the d = 32 PCA entry.
PAPER_WIDTH = {
    **{r: (16, 16) for r in ("dit-cond", "dit-uncond", "dit-no-perceptual", "dit-no-adversarial",
                              "dit-linear-gamma2")},
    **{f"{k}-d{d}": (d, 16) for k in ("pca", "pae", "pvae", "cvae") for d in (8, 16, 32, 64, 128)},
    **{f"pixel-{img}-{p}": (3 * p * p, p) for img, p in ((256, 16), (128, 8), (64, 4), (32, 2))},
    **{r: (32, 16) for r in ("lambda-gamma2", "remove-input-scaling", "image-input", "image-output",
                              "predict-x0-w", "single-level", "random-crop")},
}


def test_every_rows_tokenizer_width_is_the_papers():
    assert set(PAPER_WIDTH) == set(trajectory.ROWS)
    for name, (d, p) in PAPER_WIDTH.items():
        c = build_config(name)
        assert (c.tokenizer.latent_dim, c.model.patch_size) == (d, p), name
    # Table 1's endpoint and Table 2's conv-VAE d = 16 entry are one setting with one number.
    a, b = build_config("dit-linear-gamma2").to_dict(), build_config("cvae-d16").to_dict()
    for d in (a, b):
        d.pop("preset", None)
        d["engine"].pop("out_dir")
    assert a == b
    assert trajectory.ROWS["dit-linear-gamma2"].paper_acc == trajectory.ROWS["cvae-d16"].paper_acc == 63.4


@pytest.mark.parametrize("name", list(trajectory.ROWS))
def test_trajectory_rows_build(name):
    from ldae_fast.methods import build_method

    assert trajectory.row_overrides(name).get("tokenizer.kind", "pca") in TOKENIZERS
    c = build_config(name)
    assert c.preset == name
    # The method takes the row: every check that can refuse a combination before the tokenizer's
    # fit (a non-linear tokenizer's image output, a weighted x0 loss on a learned linear map) passes.
    assert build_method(c, "cpu").name == c.objective.method
    if name.startswith("pixel-"):
        assert c.num_patches == 256 and c.tokenizer.latent_dim == c.patch_dim
    if name != "random-crop":
        assert c.data.crop == "center"


def test_probe_sigma_and_depth():
    from ldae_fast.eval.features import ProbeView, probe_view
    from ldae_fast.methods.ldae.model import build_model
    from ldae_fast.methods.ldae.probe import probe_sigma

    c = build_config("demo")
    assert probe_sigma(c) == pytest.approx(math.sqrt(2) * 10 / 1000)
    assert probe_sigma(build_config("demo", {"eval.probe_sigma": "0.5"})) == 0.5
    assert probe_sigma(build_config("demo", {"eval.probe_t": "0"})) == 0.0
    torch.manual_seed(0)
    enc = build_model(c.model, c.ldae, c.data.img_size).encoder.eval()
    # adaLN-Zero starts as the identity: give the gates weight so sigma matters.
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, c.data.img_size, c.data.img_size)
    assert probe_view(enc, build_config("demo", {"eval.probe_t": "0"})) is enc
    v = probe_view(enc, c)
    assert isinstance(v, ProbeView) and v.num_features == enc.num_features
    with torch.no_grad():
        f0, f10 = enc.pooled(x), v.pooled(x)
        torch.testing.assert_close(f10, enc.pooled(x, sigma=probe_sigma(c)))
        assert not torch.allclose(f0, f10)
        d1 = probe_view(enc, build_config("demo", {"eval.probe_depth": "1", "eval.probe_t": "0"})).pooled(x)
        tok = enc.norm(enc.blocks[0](_tokens(enc, x), enc.embed_sigma(None, 2, x)))[:, 1:].mean(1)
        torch.testing.assert_close(d1, tok)
    with pytest.raises(ConfigError, match="eval.probe_depth=4"):
        build_config("demo", {"eval.probe_depth": "4"})
    with pytest.raises(ValueError, match="needs the checkpoint's method"):
        probe_view(enc, build_config("demo", {"eval.probe_input": "noisy"}))


def _tokens(enc, x):
    pos = enc.pos_embed
    t = enc.patch_embed(x) + pos[:, 1:]
    return torch.cat([(enc.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1), t], 1)


def test_noisy_probe_uses_the_method_noise():
    from ldae_fast.eval.features import probe_view
    from ldae_fast.methods import build_method
    from ldae_fast.methods.ldae.model import build_model
    from ldae_fast.tokenizers import PixelTokenizer

    c = build_config("demo", {"eval.probe_input": "noisy", "eval.probe_sigma": "0.5",
                              "tokenizer.kind": "pixel", "tokenizer.latent_dim": "48"})
    method = build_method(c, "cpu", tokenizer=PixelTokenizer.create(c.model.patch_size))
    enc = build_model(c.model, c.ldae, c.data.img_size).encoder.eval()
    seen = []
    real = enc.pooled
    enc.pooled = lambda x, **kw: (seen.append(x.clone()), real(x, **kw))[1]
    x = torch.zeros(2, 3, c.data.img_size, c.data.img_size)
    with torch.no_grad():
        probe_view(enc, c, method).pooled(x)
    noise = seen[0]
    # Pixel tokenizer, gamma 1, sigma 0.5: the input is x + 0.5 eps.
    assert 0.4 < float(noise.std()) < 0.6


def test_class_conditioning_embeds_labels_and_drops_them():
    from ldae_fast.batch import Batch
    from ldae_fast.methods import build_method
    from ldae_fast.methods.ldae.model import build_model, param_count
    from ldae_fast.tokenizers import PixelTokenizer

    c = build_config("demo", {"ldae.class_cond": "true", "ldae.label_dropout": "0.5",
                              "tokenizer.kind": "pixel", "tokenizer.latent_dim": "48"})
    assert c.model.num_classes == c.data.synthetic_classes
    torch.manual_seed(0)
    model = build_model(c.model, c.ldae, c.data.img_size)
    assert sum(p.numel() for p in model.parameters()) == param_count(c.model, c.ldae, c.data.img_size)["total"]
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(4, 3, c.data.img_size, c.data.img_size)
    s = torch.full((4,), 0.3)
    with torch.no_grad():
        a = model(x, s, labels=torch.tensor([0, 1, 2, 3]))
        b = model(x, s, labels=torch.tensor([1, 1, 2, 3]))
        n = model(x, s)
        n2 = model(x, s, labels=torch.full((4,), c.model.num_classes))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])
    torch.testing.assert_close(n, n2)  # no labels = the null class
    method = build_method(c, "cpu", tokenizer=PixelTokenizer.create(c.model.patch_size))
    labels = torch.arange(64) % 8
    cond = method.condition(torch.zeros(64), Batch(torch.zeros(64, 3, 32, 32), labels), step=3)
    dropped = cond["labels"] == c.model.num_classes
    assert 10 < int(dropped.sum()) < 54
    assert torch.equal(cond["labels"][~dropped], labels[~dropped])
    again = method.condition(torch.zeros(64), Batch(torch.zeros(64, 3, 32, 32), labels), step=3)
    assert torch.equal(again["labels"], cond["labels"])  # keyed on the step
    # Rows 32.. of the global batch draw what one batch of 64 drew there.
    half = method.condition(torch.zeros(32), Batch(torch.zeros(32, 3, 32, 32), labels[32:]), step=3, row=32)
    assert torch.equal(half["labels"], cond["labels"][32:])
    loss = method(model, Batch(x, torch.tensor([0, 1, 2, 3])), step=0)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="without class conditioning"):
        demo = build_config("demo")
        build_model(demo.model, demo.ldae, 32)(x, s, labels=torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("target", ["z0", "eps"])
def test_latent_targets_are_the_noise_draws(target):
    """noise.target z0 / eps: the loss compares the output image's latent with the z0 or eps of
    the very draw that made the input, so the right prediction gives zero loss."""
    from ldae_fast import reference
    from ldae_fast.batch import Batch
    from ldae_fast.methods import build_method
    from ldae_fast.tokenizers import fit_pca

    c = build_config("demo", {"noise.target": target, "noise.schedule": "linear_gamma2", "tokenizer.latent_dim": "8",
                              "engine.kernels": "reference"})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=g)
    tok = fit_pca(iter([torch.randn(16, 3, 32, 32, generator=g)]), 4, 8, 16)
    method = build_method(c, "cpu", tokenizer=tok)
    nb = method.add_noise(x, step=5)
    assert nb.target.shape == (3, 64, 8)
    V, mu = method.basis, method.mean
    z0 = (reference.patchify(x, 4) - mu) @ V.t()
    if target == "z0":
        torch.testing.assert_close(nb.target, z0, atol=1e-4, rtol=1e-4)
    else:
        # z_t = gamma z0 + sigma eps, read back from the (unscaled: VP) input.
        zt = (reference.patchify(nb.x_in, 4) - mu) @ V.t()
        torch.testing.assert_close(zt, nb.gamma.view(-1, 1, 1) * z0 + nb.sigma.view(-1, 1, 1) * nb.target,
                                   atol=1e-4, rtol=1e-4)
    perfect = reference.unpatchify(nb.target @ V + mu, 4, 32, 32)
    assert float(method.loss(perfect, x, nb.lam, nb.target)) < 1e-8
    assert float(method.loss(perfect + 0.1, x, nb.lam, nb.target)) > 1e-4

    class Echo(torch.nn.Module):
        def forward(self, x_in, sigma=None):
            return x_in

    # Through __call__: the same draw (same step) feeds the loss.
    loss = method(Echo(), Batch(x), step=5)
    lat = (reference.patchify(nb.x_in, 4) - mu) @ V.t()
    expect = (nb.lam * (lat - nb.target).square().sum(-1).mean(-1)).mean()
    torch.testing.assert_close(loss, expect, atol=1e-5, rtol=1e-5)


def test_trajectory_targets():
    assert build_config("pca-d32").noise.target == "eps"
    assert build_config("lambda-gamma2").noise.target == "z0"
    c = build_config("predict-x0-w")
    assert (c.noise.target, c.noise.low_weight, c.noise.high_weight) == ("x0", 1.0, 0.1)
    assert build_config("ldae-vitb").noise.target == "x0"


def test_latent_tokens_in_and_out():
    """ldae.input / ldae.output = 'latent': the network is fed z_t (B, N, d) and returns (B, N, d),
    compared with the target directly; figures and the probe go through the tokenizer."""
    from ldae_fast import reference
    from ldae_fast.batch import Batch
    from ldae_fast.eval.features import probe_view
    from ldae_fast.methods import build_method
    from ldae_fast.methods.ldae.model import build_model, flops_per_image, param_count
    from ldae_fast.tokenizers import fit_pca

    c = build_config("demo", {"ldae.input": "latent", "ldae.output": "latent", "noise.target": "eps",
                              "noise.schedule": "linear_gamma2", "tokenizer.latent_dim": "8",
                              "engine.kernels": "reference"})
    assert c.model.latent_dim == 8
    g = torch.Generator().manual_seed(0)
    tok = fit_pca(iter([torch.randn(16, 3, 32, 32, generator=g)]), 4, 8, 16)
    method = build_method(c, "cpu", tokenizer=tok)
    torch.manual_seed(0)
    model = build_model(c.model, c.ldae, 32)
    assert sum(p.numel() for p in model.parameters()) == param_count(c.model, c.ldae, 32)["total"]
    img = build_config("demo")
    assert param_count(c.model, c.ldae, 32)["total"] < param_count(img.model, img.ldae, 32)["total"]
    assert flops_per_image(c.model, c.ldae, 32) < flops_per_image(img.model, img.ldae, 32)
    x = torch.randn(2, 3, 32, 32, generator=g)
    nb = method.add_noise(x, step=1)
    assert nb.x_in.shape == (2, 64, 8) and nb.target.shape == (2, 64, 8)
    z0 = method.tokens(x)
    torch.testing.assert_close(nb.x_in, nb.gamma.view(-1, 1, 1) * z0 + nb.sigma.view(-1, 1, 1) * nb.target,
                               atol=1e-5, rtol=1e-5)
    out = model(nb.x_in, nb.sigma)
    assert out.shape == (2, 64, 8)
    loss = method(model, Batch(x), step=1)
    # The zero-initialised head predicts 0: the loss is lambda |eps|^2 per token.
    torch.testing.assert_close(loss, (nb.lam * nb.target.square().sum(-1).mean(-1)).mean())
    loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None
    pairs = method.sample(model, x, [0.5])
    assert pairs[0][0].shape == x.shape and pairs[0][1].shape == x.shape
    view = probe_view(model.encoder.eval(), c, method)
    with torch.no_grad():
        f = view.pooled(x)
        ref = model.encoder.pooled(reference.patchify(x, 4).sub(method.mean) @ method.basis.t(),
                                   sigma=view.sigma)
    torch.testing.assert_close(f, ref)
    with pytest.raises(ValueError, match="needs the checkpoint's method"):
        probe_view(model.encoder, c)
    with pytest.raises(ConfigError, match="needs ldae.output='image'"):
        build_config("demo", {"ldae.output": "latent"})
