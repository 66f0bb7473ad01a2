"""DiffMAE: keyed masks, the rho schedule, the masked loss, the inpainting sampler, exact resume
and the presets against the supplement's tables."""

import dataclasses

import pytest
import torch
from tiny_runs import TINY_NET, tiny_config

from ldae_fast.batch import Batch
from ldae_fast.config import ConfigError, build_config
from ldae_fast.errors import ResumeMismatch
from ldae_fast.methods import METHODS, Method, build_method
from ldae_fast.methods.diffmae import method as dm
from ldae_fast.methods.diffmae.finetune import DIFFMAE_FINETUNE
from ldae_fast.methods.diffmae.model import build_diffmae as build_model
from ldae_fast.methods.diffmae.presets import DIFFMAE_GLOBAL_BATCH
from ldae_fast.methods.diffmae.schedules import DiffusionSchedule, ddpm_betas
from ldae_fast.methods.masking import (
    center_block_mask,
    from_scores,
    gather_tokens,
    num_visible,
    random_masking,
    scatter_tokens,
)
from ldae_fast.reference import patchify

TINY = {**TINY_NET, "eval.probe": "false", "diffmae.sample_steps": "8"}


def _cfg(tmp_path=None, **over):
    return tiny_config("diffmae-demo", TINY, tmp_path, **over)


# masking ------------------------------------------------------------------------------------
def test_masking_is_keyed_exact_and_restorable():
    a = random_masking(6, 49, 0.75, seed=3, step=7)
    b = random_masking(6, 49, 0.75, seed=3, step=7)
    for x, y in zip((a.ids_keep, a.ids_masked, a.ids_restore, a.mask), (b.ids_keep, b.ids_masked, b.ids_restore, b.mask)):
        assert torch.equal(x, y)
    assert not torch.equal(a.mask, random_masking(6, 49, 0.75, seed=3, step=8).mask)
    assert not torch.equal(a.mask, random_masking(6, 49, 0.75, seed=4, step=7).mask)
    # The ratio is exact per row, MAE's rounding: int(49 * 0.25) = 12 visible.
    assert a.ids_keep.shape == (6, 12) and a.ids_masked.shape == (6, 37)
    assert (a.mask.sum(1) == 37).all()
    assert num_visible(196, 0.75) == 49 and num_visible(1568, 0.9) == 156
    # ids_restore undoes the shuffle: cat([visible, masked]) gathered by it is the original order.
    x = torch.randn(6, 49, 5)
    shuffled = torch.cat([gather_tokens(x, a.ids_keep), gather_tokens(x, a.ids_masked)], 1)
    assert torch.equal(gather_tokens(shuffled, a.ids_restore), x)
    hidden = torch.zeros(6, 49, dtype=torch.bool).scatter(1, a.ids_masked, True)
    assert torch.equal(hidden, a.mask)


def test_ranks_and_micro_batches_draw_the_global_batch_masks():
    whole = random_masking(8, 16, 0.75, seed=0, step=5)
    part = random_masking(3, 16, 0.75, seed=0, step=5, row=4, global_batch=8)
    assert torch.equal(part.ids_keep, whole.ids_keep[4:7]) and torch.equal(part.mask, whole.mask[4:7])
    with pytest.raises(ValueError, match="outside"):
        random_masking(3, 16, 0.75, seed=0, step=5, row=6, global_batch=8)


def test_center_block_hides_the_middle_half_of_each_side():
    m = center_block_mask(2, 16, 16)  # 256 px at patch 16: the center 128x128
    grid = m.mask.view(2, 16, 16)
    assert grid[:, 4:12, 4:12].all() and grid.sum() == 2 * 64
    assert torch.equal(grid[0], grid[1])
    assert m.ids_keep.shape == (2, 192)
    # Ties in the scores keep index order, so visible ids come out sorted.
    assert torch.equal(from_scores(torch.zeros(1, 4), 2).ids_keep, torch.tensor([[0, 1]]))


# schedule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.6, 0.8, 1.0])
def test_schedule_matches_the_formula(rho):
    T = 1000
    s = DiffusionSchedule.ddpm(T, rho)
    ab = 1.0
    for t in range(T):
        beta = (1e-4 + (0.02 - 1e-4) * t / (T - 1)) ** rho
        assert float(s.betas[t]) == pytest.approx(beta, rel=1e-12)
        ab *= 1.0 - beta
        if t in (0, 1, 499, 999):
            assert float(s.alphas_cumprod[t]) == pytest.approx(ab, rel=1e-9)
    x0, eps, t = torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.tensor([0, 500, 999])
    xt = s.q_sample(x0, t, eps)
    for b in range(3):
        a = float(s.alphas_cumprod[t[b]])
        assert torch.allclose(xt[b], a ** 0.5 * x0[b] + (1 - a) ** 0.5 * eps[b], atol=1e-6)


def test_smaller_rho_means_more_noise_and_respacing_keeps_abar():
    ab = {r: DiffusionSchedule.ddpm(1000, r).alphas_cumprod for r in (0.6, 0.8, 1.0)}
    assert (ab[0.6] < ab[0.8]).all() and (ab[0.8] < ab[1.0]).all()
    s = DiffusionSchedule.ddpm(1000, 0.8)
    ts, chain = s.respaced(10)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 10
    assert torch.allclose(chain.alphas_cumprod, s.alphas_cumprod[ts], rtol=1e-12)
    assert torch.equal(s.respaced(1000)[1].betas, s.betas) or torch.allclose(s.respaced(1000)[1].betas, s.betas)
    c0, ct, var = chain.posterior(0)
    assert c0 == pytest.approx(1.0) and ct == 0.0 and var == 0.0
    with pytest.raises(ValueError, match="rho"):
        ddpm_betas(10, rho=0.0)


# model --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["joint", "cross", "cross_self"])
def test_model_predicts_masked_patches_and_its_encoder_serves_eval(kind):
    cfg = _cfg(**{"diffmae.decoder_kind": kind})
    model = build_model(cfg.model, cfg.diffmae, 16)
    x = torch.randn(2, 3, 16, 16)
    mk = random_masking(2, 16, 0.75, seed=0, step=0)
    noisy = torch.randn(2, 12, 48)
    t = torch.tensor([0, 999])
    out = model(x, ids_keep=mk.ids_keep, ids_masked=mk.ids_masked, noisy=noisy, t=t)
    assert out.shape == (2, 12, 48)
    # The encoder sees the visible patches only: hidden pixels do not reach the prediction
    # except through the noised input.
    x2 = x.clone()
    hid = mk.ids_masked[0, 0]
    r, c = divmod(int(hid), 4)
    x2[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 5.0
    # Zero-initialised heads predict 0; give them weights so the check means something.
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    a = model(x, ids_keep=mk.ids_keep, ids_masked=mk.ids_masked, noisy=noisy, t=t)
    b = model(x2, ids_keep=mk.ids_keep, ids_masked=mk.ids_masked, noisy=noisy, t=t)
    assert torch.allclose(a, b) and a.abs().sum() > 0
    # The same encoder on whole images: what the probe, kNN and fine-tune call.
    from ldae_fast.eval.features import pool_features
    assert pool_features(model.encoder, x).shape == (2, 32)
    assert model.encoder.forward_features(x).shape == (2, 17, 32)


def test_encoder_exports_to_timm_exactly():
    import timm

    from ldae_fast.models import timm_kwargs, timm_state_dict
    c = _cfg()
    model = build_model(c.model, c.diffmae, 16).eval()
    for p in model.encoder.parameters():
        torch.nn.init.normal_(p, std=0.05)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_kwargs(model.encoder)).eval()
    vit.load_state_dict(timm_state_dict(model.encoder), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(vit.forward_features(x), model.encoder.forward_features(x), atol=1e-6)


@pytest.mark.parametrize("kind", ["joint", "cross", "cross_self"])
def test_analytic_flops_match_the_counted_matmuls(kind):
    from torch.utils.flop_counter import FlopCounterMode

    from ldae_fast.methods.diffmae.model import flops_per_image
    cfg = build_config("diffmae-demo", {"diffmae.decoder_kind": kind, "model.attn_backend": "math",
                                        "model.decoder_width": "64", "model.decoder_heads": "2"})
    model = build_model(cfg.model, cfg.diffmae, 32)
    mk = random_masking(1, 64, 0.75, seed=0, step=0)
    with FlopCounterMode(display=False) as fc:
        model(torch.randn(1, 3, 32, 32), ids_keep=mk.ids_keep, ids_masked=mk.ids_masked,
              noisy=torch.randn(1, 48, 48), t=torch.tensor([5]))
    assert fc.get_total_flops() == flops_per_image(cfg.model, cfg.diffmae, 32) == METHODS["diffmae"].train_flops(cfg)[0]
    assert flops_per_image(cfg.model, cfg.diffmae, 32, mask_ratio=0.0) > flops_per_image(cfg.model, cfg.diffmae, 32)


# loss ---------------------------------------------------------------------------------------
def test_loss_covers_only_the_masked_patches():
    pred, target = torch.randn(3, 16, 12), torch.randn(3, 16, 12)
    mask = random_masking(3, 16, 0.75, seed=1, step=0).mask
    base = dm.masked_mse(pred, target, mask)
    moved = pred.clone()
    moved[~mask] += 100.0
    assert torch.equal(dm.masked_mse(moved, target, mask), base)
    moved[mask] += 1.0
    assert not torch.allclose(dm.masked_mse(moved, target, mask), base)
    per = (pred - target).square().mean(-1)
    assert torch.allclose(base, per[mask].mean())


def test_method_call_noises_and_scores_the_masked_patches(monkeypatch):
    cfg = _cfg()
    method = build_method(cfg, "cpu")
    assert isinstance(method, Method) and METHODS["diffmae"].name == method.name == "diffmae"
    x = torch.randn(4, 3, 16, 16)
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, images, *, ids_keep, ids_masked, noisy, t):
            seen.update(ids_keep=ids_keep, ids_masked=ids_masked, noisy=noisy, t=t)
            return torch.zeros_like(noisy)

    loss = method(Spy(), Batch(x), step=3)
    tgt = patchify(x, 4)
    mk = method.draw_mask(4, 16, 3, 0, 4)
    assert torch.equal(seen["ids_masked"], mk.ids_masked) and seen["noisy"].shape == (4, 12, 48)
    t = seen["t"]
    assert t.dtype == torch.int64 and ((0 <= t) & (t < 1000)).all()
    eps = gather_tokens(method.draw_eps(4, 16, 48, 3, 0), mk.ids_masked)
    x0 = gather_tokens(tgt, mk.ids_masked)
    assert torch.allclose(seen["noisy"], method.schedule.q_sample(x0, t, eps), atol=1e-6)
    # A zero prediction's loss is the mean square of the hidden patches, visible ones aside.
    full = scatter_tokens(tgt, mk.ids_masked, torch.zeros_like(x0))
    assert torch.allclose(loss, dm.masked_mse(full, tgt, mk.mask))
    # Accumulated micro-batches / ranks draw the rows of the whole global batch.
    m2 = build_method(cfg, "cpu", rank=1, world_size=2)
    assert torch.equal(m2.draw_mask(4, 16, 3, *m2.rows(4, 1, 2)).mask,
                       method.draw_mask(16, 16, 3, 0, 16).mask[12:16])
    assert torch.equal(m2.draw_eps(2, 16, 48, 3, 13), method.draw_eps(4, 16, 48, 3, 12)[1:3])
    assert torch.equal(m2.draw_t(4, 3, *m2.rows(4, 1, 2)), method.draw_t(16, 3, 0, 16)[12:16])


def test_norm_pix_target_is_per_patch_normalised():
    method = build_method(_cfg(**{"diffmae.norm_pix_loss": "true"}), "cpu")
    p = method.patches(torch.randn(2, 3, 16, 16) * 3 + 1)
    assert torch.allclose(p.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(p.var(-1), torch.ones(2, 16), atol=1e-3)


# sampler ------------------------------------------------------------------------------------
class Oracle(torch.nn.Module):
    """A perfect denoiser: predicts the true clean hidden patches at every step."""

    def __init__(self, patches):
        super().__init__()
        self.patches = patches
        self.calls = 0

    def encode(self, x, ids_keep):
        return x

    def decode(self, ctx, ids_keep, ids_masked, noisy, t):
        self.calls += 1
        return gather_tokens(self.patches, ids_masked)


@pytest.mark.parametrize("kind", ["random", "center"])
def test_sampler_with_a_perfect_denoiser_reproduces_the_image(kind):
    cfg = _cfg(**{"diffmae.sample_steps": "20"})
    method = build_method(cfg, "cpu")
    x = torch.randn(3, 3, 16, 16)
    oracle = Oracle(patchify(x, 4))
    out = method.sample(oracle, x, (1000, 500, 0), mask=kind)
    assert oracle.calls == 20 and len(out) == 3
    masked, final = out[-1]
    assert torch.allclose(final, x, atol=1e-5)
    mk = method.make_mask(kind, 3, 4)
    vis = ~mk.mask
    # Visible patches are the original's bit for bit at every recorded step, and blanked in the input.
    for _, img in out:
        assert torch.equal(patchify(img, 4)[vis], patchify(x, 4)[vis])
    assert (patchify(masked, 4)[mk.mask] == 0).all()


def test_sampler_with_a_real_model_keeps_visible_patches():
    cfg = _cfg()
    method = build_method(cfg, "cpu")
    model = build_model(cfg.model, cfg.diffmae, 16)
    for p in model.decoder.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 16, 16)
    mk = method.make_mask("random", 2, 4)
    final, snaps = method.inpaint(model, x, mk, steps=5, record=[1000, 500])
    assert set(snaps) == {1000, 500} and final.shape == (2, 16, 48)
    assert torch.equal(final[~mk.mask], patchify(x, 4)[~mk.mask])
    assert not torch.allclose(final[mk.mask], patchify(x, 4)[mk.mask])
    again, _ = method.inpaint(model, x, mk, steps=5)
    assert torch.equal(final, again)  # keyed: the same figure every time


# engine -------------------------------------------------------------------------------------
def test_resume_is_bit_exact(tmp_path):
    from ldae_fast.engine import checkpoint as ck
    from ldae_fast.engine.loop import train

    over = {"engine.steps": 4}
    ref = train(_cfg(tmp_path / "a", **over))
    part = train(_cfg(tmp_path / "b", **{"engine.steps": 4, "engine.ckpt_every": 2}))
    ck_dir = tmp_path / "b" / "run" / "checkpoints"
    import shutil
    shutil.rmtree(ck_dir / "step_00000004")
    res = train(_cfg(tmp_path / "b", **{**over, "engine.resume": "auto"}))
    assert res.losses == ref.losses[2:] and part.losses == ref.losses
    a, b = ref.model.state_dict(), res.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    st = ck.load_state(res.checkpoint)
    assert st["method"]["schedule"] == {"num_timesteps": 1000, "rho": 0.8}
    from ldae_fast.eval.reader import load_for_eval

    cfg, model, method = load_for_eval(res.checkpoint)
    assert method.name == "diffmae" == cfg.objective.method
    assert torch.equal(model.state_dict()[next(iter(a))], a[next(iter(a))])
    # Another schedule would resume a different run.
    m = build_method(_cfg(**{"diffmae.rho": "0.6"}), "cpu")
    with pytest.raises(ResumeMismatch, match="diffmae.rho"):
        m.prepare(lambda: [], state=st["method"])


# config -------------------------------------------------------------------------------------
def test_diffmae_reads_its_own_schedule_length_and_old_configs_keep_theirs(tmp_path):
    """T is diffmae.num_timesteps; l-DAE's noise.num_timesteps, which DiffMAE read before, is not
    read, refused on the command line with the new name, and taken over from a config saved before."""
    import json

    from ldae_fast.config import Config, parse_cli

    cfg = _cfg(**{"diffmae.num_timesteps": 200})
    m = build_method(cfg, "cpu")
    assert m.schedule.num_timesteps == 200 and m.state_dict()["schedule"]["num_timesteps"] == 200
    assert cfg.noise.num_timesteps == 1000
    with pytest.raises(ConfigError, match=r"--noise.num_timesteps: .*reads diffmae.num_timesteps instead: "
                                          r"set --diffmae.num_timesteps=200"):
        _cfg(**{"noise.num_timesteps": 200})
    with pytest.raises(ConfigError, match=r"diffmae.sample_steps=300 exceeds diffmae.num_timesteps=200"):
        _cfg(**{"diffmae.num_timesteps": 200, "diffmae.sample_steps": 300})
    # A config (or a checkpoint's) saved before the field: T in noise.num_timesteps, none in diffmae.
    old = cfg.to_dict()
    del old["diffmae"]["num_timesteps"]
    old["noise"]["num_timesteps"] = 200
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    for back in (Config.from_dict(old), Config.load(path), parse_cli(["--config", str(path)])[0]):
        assert back.diffmae.num_timesteps == 200 and back.noise.num_timesteps == 1000
        assert back.to_dict()["noise"] == dataclasses.asdict(type(back.noise)())
        build_method(back, "cpu").prepare(lambda: [], state=m.state_dict())  # resumes its checkpoint
    # ... and a checkpoint of that T does not resume under the default one, naming the field.
    with pytest.raises(ResumeMismatch, match=r"diffmae.num_timesteps"):
        build_method(_cfg(), "cpu").prepare(lambda: [], state=m.state_dict())
    # l-DAE keeps its own noise.num_timesteps; a saved l-DAE config is not taken over.
    ld = build_config("demo", {"noise.num_timesteps": "200"}).to_dict()
    del ld["diffmae"]["num_timesteps"]
    assert Config.from_dict(ld).noise.num_timesteps == 200
    assert Config.from_dict(ld).diffmae.num_timesteps == 1000


def test_presets_follow_the_supplement_table_1a():
    for size, preset in (("B", "diffmae-vitb"), ("L", "diffmae-vitl"), ("H", "diffmae-vith")):
        c = build_config(preset)
        assert c.objective.method == "diffmae" and c.model.size == size
        assert (c.optim.beta1, c.optim.beta2, c.optim.weight_decay) == (0.9, 0.95, 0.05)
        assert c.optim.warmup_epochs == 40 and c.optim.blr == 1.5e-4 and c.engine.epochs == 1600
        assert c.optim.min_lr == 0.0 and c.optim.clip_grad == 0.0
        assert c.data.hflip and c.data.crop_min_scale < 1.0  # RandomResizedCrop + flip
        assert c.global_batch(8) == DIFFMAE_GLOBAL_BATCH == 4096
        assert c.diffmae.mask_ratio == 0.75 and c.diffmae.num_timesteps == 1000
    assert build_config("diffmae-vith").model.patch_size == 14
    assert build_config("diffmae-vitl").model.width == 1024


def test_finetune_recipes_follow_the_supplement_table_1b():
    from ldae_fast.eval.finetune import FinetuneRecipe
    want = {"B": (5e-4, 0.65, 100, 0.1), "L": (1e-3, 0.7, 50, 0.1), "H": (1e-3, 0.75, 50, 0.3)}
    for size, (blr, ld, ep, dp) in want.items():
        r = dataclasses.replace(FinetuneRecipe(), **DIFFMAE_FINETUNE[size])
        assert (r.blr, r.layer_decay, r.epochs, r.drop_path) == (blr, ld, ep, dp)
        assert (r.mixup, r.cutmix, r.label_smoothing, r.min_lr, r.warmup_epochs, r.batch_size) == (
            0.8, 1.0, 0.1, 1e-6, 5.0, 1024)
        assert r.rand_augment.startswith("rand-m9-mstd0.5") and r.pool == "avg"


def test_config_refuses_a_network_the_method_cannot_train():
    # model.arch is gone: the method names its network; an old saved config's copy is dropped.
    with pytest.raises(ConfigError, match="unknown field 'arch'"):
        build_config("diffmae-demo", {"model.arch": "ldae"})
    with pytest.raises(ConfigError, match="objective.method="):
        build_config("demo", {"objective.method": "unet"})
    with pytest.raises(ConfigError, match="mask_ratio"):
        build_config("diffmae-demo", {"diffmae.mask_ratio": "1.0"})
    with pytest.raises(ConfigError, match="decoder_kind"):
        build_config("diffmae-demo", {"diffmae.decoder_kind": "unet"})
    assert build_config("demo").objective.method == "ldae"


def test_train_main_writes_the_inpainting_figure(tmp_path):
    from PIL import Image

    from ldae_fast.train import main
    args = ["--preset", "diffmae-demo", f"--engine.out_dir={tmp_path / 'run'}"]
    args += [f"--{k}={v}" for k, v in {**TINY, "eval.figure": "true", "engine.steps": "2",
                                       "diffmae.sample_steps": "4"}.items()]
    assert main(args) == 0
    png = tmp_path / "run" / "inpainting.png"
    img = Image.open(png)
    # 4 images x 2 masks rows; original, masked, t = 1000, 500, 0 columns of 64 px cells.
    assert img.size == (5 * 64 + 6 * 2, 12 + 2 + 8 * 64 + 9 * 2)
