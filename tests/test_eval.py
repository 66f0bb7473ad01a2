"""Evaluation: LARS, linear probe (fast and full), kNN, fine-tuning, denoising figure, driver.

Most tests use small stand-in modules with the encoder's methods (fast, and they pin down the
surface eval relies on); the rest run the real model, engine and export.
"""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from ldae_fast import models
from ldae_fast.engine import loop
from ldae_fast.eval import driver, export, reader
from ldae_fast.eval.features import extract_features
from ldae_fast.eval.knn import knn_classify
from ldae_fast.eval.lars import LARS
from ldae_fast.eval.linear_probe import (
    FAST_PROTOCOL,
    linear_probe,
    quick_probe,
    topk_accuracy,
    train_head_cached,
)


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine's 2 cores are shared: a second OpenMP thread spin-waits on a busy core and
    # makes these many tiny ops ~40x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class StandInEncoder(nn.Module):
    """The ViTEncoder surface the eval code uses: forward_features -> (B, 1+N, width), pooled,
    num_features, blocks."""

    def __init__(self, width=16, patch=4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList([nn.Linear(width, width)])
        self.num_features = width

    def forward_features(self, x, sigma=None):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1)
        return t + self.blocks[0](t).tanh()

    def pooled(self, x, pool="avg"):
        t = self.forward_features(x)
        return t[:, 0] if pool == "cls" else t[:, 1:].mean(1)


def _color_images(M, C, size=16, seed=0):
    """Classes differ by mean colour: a linear probe on pooled patch features separates them."""
    colors = torch.randn(C, 3, 1, 1, generator=torch.Generator().manual_seed(1000))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (M,), generator=g)
    x = colors[y] + 0.3 * torch.randn(M, 3, size, size, generator=g)
    return x, y


# LARS ---------------------------------------------------------------------------------------

def _lars_pair():
    w = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    return w, b


def _set_grads(w, b):
    w.grad = torch.tensor([[0.6, 0.0], [0.0, 0.8]])  # |g| = 1
    b.grad = torch.tensor([0.5, 0.5])


def _lars_first_step(weight_decay: float):
    """(w, b, optimizer) after one LARS step at lr 2 from _lars_pair with _set_grads' gradients."""
    w, b = _lars_pair()
    opt = LARS([w, b], lr=2.0, weight_decay=weight_decay, momentum=0.9, trust_coefficient=0.001)
    _set_grads(w, b)
    opt.step()
    return w, b, opt


def test_lars_two_steps_by_hand():
    w, b, opt = _lars_first_step(0.0)
    # step 1: ratio 0.001 * 5 / 1 = 0.005, u = 0.005 g, w -= 2 u. Bias: plain SGD, b -= 2 * 0.5.
    assert torch.allclose(w, torch.tensor([[2.994, 0.0], [0.0, 3.992]]), atol=1e-6)
    assert torch.allclose(b, torch.tensor([0.0, -2.0]), atol=1e-6)
    _set_grads(w, b)
    opt.step()
    # step 2: |w| = sqrt(2.994^2 + 3.992^2) = 4.99, ratio 0.00499, u = [0.002994, 0.003992],
    # m = 0.9 * [0.003, 0.004] + u = [0.005694, 0.007592], w -= 2 m. Bias: m = 0.95, b -= 1.9.
    assert torch.allclose(w, torch.tensor([[2.982612, 0.0], [0.0, 3.976816]]), atol=1e-6)
    assert torch.allclose(b, torch.tensor([-1.9, -3.9]), atol=1e-6)


def test_lars_weight_decay_skips_1d_and_zero_grad_is_safe():
    w, b, _ = _lars_first_step(0.1)
    # u = g + 0.1 w = diag(0.9, 1.2), |u| = 1.5, ratio 0.001 * 5 / 1.5: u = diag(0.003, 0.004).
    assert torch.allclose(w, torch.tensor([[2.994, 0.0], [0.0, 3.992]]), atol=1e-6)
    # The bias takes no decay: the same step as without weight decay.
    assert torch.allclose(b, torch.tensor([0.0, -2.0]), atol=1e-6)
    z = nn.Parameter(torch.zeros(2, 2))
    z.grad = torch.zeros(2, 2)
    LARS([z], lr=1.0).step()
    assert torch.isfinite(z).all() and (z == 0).all()


# linear probe -------------------------------------------------------------------------------

def test_topk():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0]])
    assert topk_accuracy(logits, torch.tensor([5, 5])) == [50.0, 50.0]
    assert topk_accuracy(logits, torch.tensor([1, 1])) == [0.0, 100.0]


def _blobs(M, dim, C, seed, sep=4.0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, dim, generator=g) * sep / math.sqrt(dim)
    y = torch.randint(0, C, (M,), generator=g)
    # An offset and a large scale: the head's BatchNorm has to absorb both.
    return 30 * (means[y] + 0.5 * torch.randn(M, dim, generator=g)) + 7, y


def test_probe_separable_features_and_shuffled_labels():
    # LARS moves the head by ~lr * 0.001 of its norm per step (x10 with momentum): the protocol
    # needs ~2000 steps' worth (lars_budget ~2) to converge, i.e. many images per epoch.
    x, y = _blobs(16384 + 512, 32, 4, seed=10)
    xt, yt, xv, yv = x[:16384], y[:16384], x[16384:], y[16384:]
    res = train_head_cached(xt, yt, xv, yv, epochs=30, batch_size=1024, blr=0.1)
    assert res["protocol"] == FAST_PROTOCOL and res["lr"] == pytest.approx(0.4)
    assert res["lars_budget"] > 1.5
    assert res["top1"] > 95 and res["top5"] == 100.0
    perm = torch.randperm(len(yt), generator=torch.Generator().manual_seed(1))
    shuffled = train_head_cached(xt, yt[perm], xv, yv, epochs=30, batch_size=1024, blr=0.1)
    assert 12 < shuffled["top1"] < 40, shuffled  # chance is 25%


def test_quick_probe_and_full_probe_with_stand_in_encoder():
    torch.manual_seed(0)
    enc = StandInEncoder()
    train, val = _color_images(1024, 4, seed=5), _color_images(128, 4, seed=6)
    enc.train()
    res = quick_probe(enc, train, val, epochs=50, batch_size=256, blr=2.0)
    assert set(res) == {"top1", "top5"} and res["top1"] > 80
    assert enc.training, "the caller's train/eval mode is restored"
    full = linear_probe(enc, train, val, epochs=2, batch_size=256, blr=0.1, pool="cls")
    assert full["protocol"] == "linear" and 0 <= full["top1"] <= 100 and full["epochs"] == 2
    assert all(p.grad is None for p in enc.parameters()), "the encoder stays frozen"


def test_extract_features_batches_and_pools():
    torch.manual_seed(0)
    enc = StandInEncoder()
    x = torch.randn(10, 3, 8, 8)
    f = extract_features(enc, x, batch_size=3)
    assert f.shape == (10, 16) and f.dtype == torch.float32
    assert torch.allclose(f, enc.pooled(x).detach(), atol=1e-5)
    fc = extract_features(enc, x, batch_size=4, pool="cls")
    assert torch.allclose(fc, enc.forward_features(x)[:, 0].detach(), atol=1e-5)


# kNN ----------------------------------------------------------------------------------------

def test_knn_weighted_vote_known_answer():
    # Query along e0. Neighbours: one class-0 point at cosine 0.99 and two class-1 points at 0.6.
    # A plain majority of the 3 would say 1; the exp(s / 0.07) weights say 0 (e^14.1 > 2 e^8.6).
    a = torch.tensor([0.99, math.sqrt(1 - 0.99**2), 0.0])
    b1 = torch.tensor([0.6, 0.0, 0.8])
    b2 = torch.tensor([0.6, 0.0, -0.8])
    far = torch.tensor([-1.0, 0.0, 0.0])
    # Scales differ wildly: only directions may matter.
    train = torch.stack([a * 100, b1 * 0.01, b2, far, far * 3])
    labels = torch.tensor([0, 1, 1, 2, 2])
    q = torch.tensor([[5.0, 0.0, 0.0], [-2.0, 0.1, 0.0]])
    out = knn_classify(train, labels, q, torch.tensor([0, 2]), ks=(3, 200), num_classes=3)
    assert out[3]["top1"] == 100.0 and out[3]["top5"] == 100.0
    assert out[200]["k_used"] == 5
    # With all 5 neighbours the 'far' points still lose for query 0 and win for query 1.
    assert out[200]["top1"] == 100.0


# fine-tuning --------------------------------------------------------------------------------

def _norm(x):
    return (x - 0.5) / 0.25


def _denorm(x):
    return x * 0.25 + 0.5


def test_finetune_few_steps_with_timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    from ldae_fast.eval.finetune import FinetuneRecipe, finetune_model

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                              num_classes=4, global_pool="avg", drop_path_rate=0.1)
    train, val = _color_images(24, 4, seed=0), _color_images(8, 4, seed=1)
    recipe = FinetuneRecipe(batch_size=8, epochs=2, max_steps=3, warmup_epochs=1)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    res = finetune_model(model, train, val, recipe, num_classes=4, norm=_norm, denorm=_denorm)
    assert res["steps"] == 3 and math.isfinite(res["last_loss"])
    assert 0 <= res["top1"] <= 100 and "ema_top1" in res
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)


def test_finetune_from_our_encoder():
    from ldae_fast.config import build_config
    from ldae_fast.eval.finetune import build_finetune_model, finetune, recipe_for

    cfg = build_config("demo")
    torch.manual_seed(0)
    from ldae_fast.methods import build_model

    enc = build_model(cfg).encoder
    vit = build_finetune_model(enc, num_classes=5)
    # The exported trunk carries our weights: the class token is the same tensor value.
    assert torch.equal(vit.cls_token.detach(), enc.cls_token.detach())
    size = cfg.data.img_size
    train, val = _color_images(16, 4, size, seed=0), _color_images(8, 4, size, seed=1)
    recipe = recipe_for(enc, batch_size=8, epochs=1, max_steps=2)
    assert recipe.layer_decay == 0.85 and recipe.drop_path == 0.1
    res = finetune(enc, train, val, recipe, norm=_norm, denorm=_denorm)
    assert res["steps"] == 2 and math.isfinite(res["last_loss"])

    # An exported encoder comes back from load_for_eval as a timm ViT behind our interface.
    wrapped = reader.TimmEncoder(models.to_timm(enc))
    vit2 = build_finetune_model(wrapped, num_classes=5, drop_path=0.1)
    assert vit2.head.out_features == 5 and vit2.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    x = _color_images(2, 2, size)[0]
    vit.eval()
    vit2.eval()
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), vit2.forward_features(x), atol=1e-4)


# figure -------------------------------------------------------------------------------------

class StandInDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))

    def forward(self, x_in, sigma):
        return self.a * x_in / (1 + sigma.view(-1, 1, 1, 1) ** 2)


def _stand_in_method(p=4, d=8, size=16):
    """The l-DAE method with a random orthonormal basis in place of a fitted one."""
    from ldae_fast.config import build_config
    from ldae_fast.methods import build_method
    from ldae_fast.tokenizers import tokenizer_from_state

    D = 3 * p * p
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))
    tok = tokenizer_from_state({"basis": q.t().contiguous(), "mean": torch.zeros(D), "eigenvalues": torch.ones(D)},
                               {"kind": "pca", "patch_size": p, "latent_dim": d})
    cfg = build_config("demo", {"model.patch_size": str(p), "data.img_size": str(size),
                                "tokenizer.latent_dim": str(d), "engine.kernels": "reference"})
    return build_method(cfg, "cpu", tokenizer=tok)


def test_denoise_figure_pixel_size(tmp_path):
    from PIL import Image

    from ldae_fast.methods.ldae.figure import denoise_figure

    imgs = _norm(torch.rand(3, 3, 16, 16))
    path = denoise_figure(StandInDenoiser(), _stand_in_method(), imgs, [0.5, 1.0],
                            tmp_path / "fig.png", denorm=_denorm)
    im = Image.open(path)
    # cells 16 px x4 = 64, 5 columns (clean + 2 x noisy/denoised), 2 px gaps, 26 px of labels.
    assert im.size == (5 * 64 + 6 * 2, 3 * 64 + 4 * 2 + 26)
    tile = torch.from_numpy(np.asarray(im.convert("RGB"))[28:28 + 64, 2:2 + 64].copy())
    expect = (_denorm(imgs[0]).clamp(0, 1) * 255).round().repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.equal(tile.permute(2, 0, 1), expect.to(torch.uint8))
    plain = denoise_figure(StandInDenoiser(), _stand_in_method(), imgs[:2], [0.2],
                             tmp_path / "plain.png", denorm=_denorm, scale=1, pad=1, labels=False)
    assert Image.open(plain).size == (3 * 16 + 4, 2 * 16 + 3)


# driver -------------------------------------------------------------------------------------

def test_driver_data_resolution(tinyimagenet_dir):
    from ldae_fast.config import build_config

    cfg = build_config("demo")
    new, _ = driver.with_data(cfg, str(tinyimagenet_dir), max_train=300)
    assert new.data.source == "wds" and new.data.epoch_size == 300
    assert new.data.train_shards == f"{tinyimagenet_dir}/train-{{000000..000009}}.tar.gz"
    assert new.data.val_shards == f"{tinyimagenet_dir}/val-{{000000..000001}}.tar.gz"
    assert new.data.img_size == cfg.data.img_size and new.model == cfg.model
    pre, _ = driver.with_data(cfg, "tiny-imagenet")
    assert pre.data.source == "wds" and pre.data.train_shards.endswith("train-{000000..000009}.tar.gz")
    syn, _ = driver.with_data(pre, "synthetic")
    assert syn.data.source == "synthetic"
    assert driver.main(["--checkpoint", "x", "--protocols", "linear-fast,bogus"]) == 2
    assert driver.main(["--checkpoint", str(tinyimagenet_dir / "nothing-here")]) == 4  # file error


def _tiny_checkpoint(tmp_path):
    """A real checkpoint from two training steps of a very small model (the lead's engine)."""
    from ldae_fast.config import build_config

    over = {"model.width": "32", "model.num_heads": "2", "model.encoder_depth": "2",
            "model.decoder_depth": "1", "data.img_size": "32", "data.batch_size": "8",
            "data.synthetic_images": "64", "tokenizer.fit_images": "32", "engine.kernels": "reference",
            "engine.steps": "2", "engine.progress": "false", "eval.probe": "false",
            "eval.figure": "false", "engine.out_dir": str(tmp_path / "run")}
    res = loop.train(build_config("demo", over))
    return res.checkpoint


def test_driver_end_to_end_tiny_imagenet(tinyimagenet_dir, tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    out = tmp_path / "eval"
    common = ["--data", str(tinyimagenet_dir), "--max-train-images", "300", "--max-val-images", "100",
              "--epochs", "2", "--batch-size", "64", "--finetune-steps", "2",
              "--finetune-batch-size", "32", "--num-workers", "0"]
    rc = driver.main(["eval", "--checkpoint", str(ckpt), *common, "--knn-k", "20,200",
                      "--protocols", "linear-fast,knn,linear,finetune,figure", "--out", str(out)])
    assert rc == 0
    rec = json.loads((out / "eval.json").read_text())
    assert rec["train_images"] == 300 and rec["val_images"] == 100
    rows = [(r["protocol"], r["encoder"]) for r in rec["rows"]]
    for p in (FAST_PROTOCOL, "knn k=20", "knn k=200", "linear", "finetune", "finetune (EMA 0.9999)"):
        i = rows.index((p, "checkpoint"))
        assert rows[i + 1] == (p, "random init"), "each floor sits right under its number"
    for r in rec["rows"]:
        assert 0 <= r["top1"] <= r["top5"] <= 100
        assert r["feature_dim"] == 32 or r["encoder"] == "pixels"  # pixels: 3 x 32 x 32
    md = (out / "eval.md").read_text()
    assert "| protocol | encoder | epochs | top-1 | top-5 | feature dim | time |" in md
    assert FAST_PROTOCOL in md
    from PIL import Image

    # 4 sigmas of the demo preset, 8 rows, 32 px cells upscaled x2.
    assert Image.open(out / "denoising.png").size == (9 * 64 + 10 * 2, 8 * 64 + 9 * 2 + 26)

    # The same encoder exported to .safetensors: a timm ViT behind our interface.
    st = export.export_encoder(ckpt, tmp_path / "enc.safetensors")
    out2 = tmp_path / "eval-st"
    rc = driver.main(["--checkpoint", str(st), *common, "--protocols", "linear-fast,finetune,figure",
                      "--out", str(out2)])
    assert rc == 0
    rec2 = json.loads((out2 / "eval.json").read_text())
    fast = {r["encoder"]: r for r in rec2["rows"] if r["protocol"] == FAST_PROTOCOL}
    # Same weights, same features, same head: the export changes nothing the probe sees.
    assert fast["checkpoint"]["top1"] == pytest.approx(
        next(r for r in rec["rows"] if r["protocol"] == FAST_PROTOCOL and r["encoder"] == "checkpoint")["top1"])
    assert any(r["protocol"] == "finetune" for r in rec2["rows"])
    assert not (out2 / "denoising.png").exists(), "an encoder-only export has no decoder to draw with"


def test_in_memory_tables_carry_the_raw_pixel_floors(tmp_path):
    """Synthetic data (the in-RAM path) puts the pixels and their PCA at the feature width under
    linear-fast and knn, as the streamed tables do."""
    ckpt = _tiny_checkpoint(tmp_path)
    out = tmp_path / "eval"
    assert driver.main(["--checkpoint", str(ckpt), "--data", "synthetic", "--protocols", "linear-fast,knn",
                        "--max-train-images", "40", "--max-val-images", "16", "--epochs", "1",
                        "--batch-size", "16", "--knn-k", "5", "--no-baseline", "--out", str(out)]) == 0
    rec = json.loads((out / "eval.json").read_text())
    dims = {(r["protocol"], r["encoder"]): r["feature_dim"] for r in rec["rows"]}
    for p in (FAST_PROTOCOL, "knn k=5"):
        assert dims[(p, "checkpoint")] == 32
        assert dims[(p, "pixels")] == 3 * 32 * 32 and dims[(p, "pixels (PCA 32)")] == 32
    assert "'pixels' rows" in (out / "eval.md").read_text()
