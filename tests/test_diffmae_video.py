"""DiffMAE on clips: spacetime masking, the tubelet network, the single-time-slice target and loss,
the video sampler, exact resume, the video presets against the supplement, and the demo."""

import shutil

import pytest
import torch
from tiny_runs import TINY_NET, tiny_config

from ldae_fast.batch import Batch
from ldae_fast.config import build_config
from ldae_fast.errors import ResumeMismatch
from ldae_fast.methods import build_method
from ldae_fast.methods.diffmae.model import build_diffmae as build_model
from ldae_fast.methods.diffmae.model import sincos_spacetime
from ldae_fast.methods.diffmae.presets import DIFFMAE_VIDEO_GLOBAL_BATCH
from ldae_fast.methods.masking import center_block_mask, gather_tokens, random_masking
from ldae_fast.reference import patchify

# Clips of 4 frames at 16 px, 2x4x4 tubelets: 2 x 16 = 32 spacetime patches, 3 visible at 90%.
TINY = {**TINY_NET, "data.num_frames": "4", "diffmae.sample_steps": "8"}


def _cfg(tmp_path=None, **over):
    return tiny_config("diffmae-video-demo", TINY, tmp_path, **over)


def _slices(x, k=0, tubelet=2):
    """Per-frame patches of frames k, k + tubelet, ... in time-major order (what the decoder predicts)."""
    f = x[:, :, k::tubelet]
    B, C, T, H, W = f.shape
    return patchify(f.transpose(1, 2).reshape(B * T, C, H, W), 4).reshape(B, T * (H // 4) * (W // 4), -1)


# masking ------------------------------------------------------------------------------------
def test_spacetime_masking_ratio_keyed_and_restorable():
    cfg = _cfg()
    method = build_method(cfg, "cpu")
    N = 2 * 16
    mk = method.draw_mask(6, N, 5, 0, 6)
    assert mk.ids_keep.shape == (6, 3) and mk.mask.sum(1).eq(N - 3).all()  # int(32 * 0.1) visible
    assert torch.equal(mk.mask, method.draw_mask(6, N, 5, 0, 6).mask)
    assert not torch.equal(mk.mask, method.draw_mask(6, N, 6, 0, 6).mask)
    # Rows differ, and the same generator as image masking (masking.random_masking) draws them.
    assert not torch.equal(mk.mask[0], mk.mask[1])
    assert torch.equal(mk.mask, random_masking(6, N, 0.9, seed=cfg.engine.seed, step=5).mask)
    tokens = torch.randn(6, N, 5)
    both = torch.cat([gather_tokens(tokens, mk.ids_keep), gather_tokens(tokens, mk.ids_masked)], 1)
    assert torch.equal(gather_tokens(both, mk.ids_restore), tokens)
    # Centre mask of a clip: the same block at every tubelet step.
    c = center_block_mask(2, 4, 4, 0.5, frames=2)
    assert torch.equal(c.mask[:, :16], c.mask[:, 16:]) and c.mask[0, :16].sum() == 4


# network ------------------------------------------------------------------------------------
def test_tubelet_network_shapes_and_embedding():
    cfg = _cfg()
    model = build_model(cfg.model, cfg.diffmae, 16)
    emb = model.encoder.patch_embed
    x = torch.randn(2, 3, 4, 16, 16)
    tok = emb(x)
    assert tok.shape == (2, 32, 32)
    # Token n = t' * 16 + row * 4 + col is a linear map of tubelet (frames 2t', 2t'+1; that p x p cell).
    n, tp, r, c = 21, 1, 1, 1
    cell = x[:, :, 2 * tp:2 * tp + 2, 4 * r:4 * r + 4, 4 * c:4 * c + 4]
    want = torch.einsum("bctij,octij->bo", cell, emb.proj.weight) + emb.proj.bias
    assert torch.allclose(tok[:, n], want, atol=1e-5)
    pos = model.encoder.pos_embed[0, 1:]
    assert pos.shape == (32, 32) and torch.unique(pos, dim=0).shape[0] == 32
    # Separable: the space channels repeat across time, the time channels across space.
    assert torch.equal(pos[:16, :24], pos[16:, :24]) and torch.equal(pos[:16, 24:], pos[:1, 24:].expand(16, -1))
    assert torch.equal(sincos_spacetime(32, 2, 4), model.decoder.pos_embed[0])
    mk = random_masking(2, 32, 0.9, seed=0, step=0)
    out = model(x, ids_keep=mk.ids_keep, ids_masked=mk.ids_masked, noisy=torch.randn(2, 29, 48),
                t=torch.tensor([3, 900]))
    assert out.shape == (2, 29, 48)  # one 4x4x3 time slice per hidden tubelet
    with pytest.raises(ValueError, match="built for clips"):
        model.encoder.patch_embed(torch.randn(2, 3, 16, 16))


def test_analytic_flops_match_the_counted_matmuls_for_clips():
    from torch.utils.flop_counter import FlopCounterMode

    from ldae_fast.methods.diffmae.model import flops_per_image
    cfg = _cfg(**{"model.attn_backend": "math"})
    model = build_model(cfg.model, cfg.diffmae, 16)
    mk = random_masking(1, 32, 0.75, seed=0, step=0)
    with FlopCounterMode(display=False) as fc:
        model(torch.randn(1, 3, 4, 16, 16), ids_keep=mk.ids_keep, ids_masked=mk.ids_masked,
              noisy=torch.randn(1, 24, 48), t=torch.tensor([5]))
    assert fc.get_total_flops() == flops_per_image(cfg.model, cfg.diffmae, 16, mask_ratio=0.75)


def test_training_flops_of_a_clip_match_the_counter():
    # The trainer's MFU: forward + backward, less the input gradients (the clip's tubelets) no one needs.
    from torch.utils.flop_counter import FlopCounterMode

    from ldae_fast.methods.diffmae.flops import diffmae_train_flops_per_image
    cfg = _cfg(**{"model.attn_backend": "math"})
    model = build_model(cfg.model, cfg.diffmae, 16)
    mk = random_masking(1, 32, 0.75, seed=0, step=0)
    with FlopCounterMode(display=False) as fc:
        out = model(torch.randn(1, 3, 4, 16, 16), ids_keep=mk.ids_keep, ids_masked=mk.ids_masked,
                    noisy=torch.randn(1, 24, 48), t=torch.tensor([5]))
        out.float().square().mean().backward()
    assert diffmae_train_flops_per_image(cfg.model, cfg.diffmae, 16, 0.75)[1] == pytest.approx(fc.get_total_flops(), rel=1e-9)


# target and loss ----------------------------------------------------------------------------
class Zero(torch.nn.Module):
    """Predicts 0 for every hidden slice, whatever it is shown."""

    def forward(self, x, *, ids_keep, ids_masked, noisy, t):
        self.seen = dict(ids_keep=ids_keep, ids_masked=ids_masked, noisy=noisy, t=t)
        return torch.zeros_like(noisy)


@pytest.mark.parametrize("k", [0, 1])
def test_target_is_one_time_slice_and_loss_covers_only_masked_tubelets(k):
    method = build_method(_cfg(**{"diffmae.time_slice": k}), "cpu")
    x = torch.randn(4, 3, 4, 16, 16)
    assert torch.equal(method.patches(x), _slices(x, k))
    spy = Zero()
    loss = method(spy, Batch(x), step=2)
    mk = method.draw_mask(4, 32, 2, 0, 4)
    x0 = gather_tokens(_slices(x, k), mk.ids_masked)
    eps = gather_tokens(method.draw_eps(4, 32, 48, 2, 0), mk.ids_masked)
    assert torch.allclose(spy.seen["noisy"], method.schedule.q_sample(x0, spy.seen["t"], eps), atol=1e-6)
    assert torch.allclose(loss, x0.square().mean())

    def with_cell(y, tube, frame, value):
        # Overwrite tubelet `tube` (time-major id) of sample 0 in one of its two frames.
        tp, rc = divmod(int(tube), 16)
        r, c = divmod(rc, 4)
        y = y.clone()
        y[0, :, 2 * tp + frame, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = value
        return y

    visible, hidden = mk.ids_keep[0, 0], mk.ids_masked[0, 0]
    for frame in (0, 1):  # a visible tubelet's pixels, either frame, carry no loss
        assert torch.equal(method(Zero(), Batch(with_cell(x, visible, frame, 50.0)), step=2), loss)
    # A hidden tubelet: only its predicted slice counts, the other frame is context-free and lossless.
    assert torch.equal(method(Zero(), Batch(with_cell(x, hidden, 1 - k, 50.0)), step=2), loss)
    assert not torch.allclose(method(Zero(), Batch(with_cell(x, hidden, k, 50.0)), step=2), loss)


# sampler ------------------------------------------------------------------------------------
class Oracle(torch.nn.Module):
    def __init__(self, patches):
        super().__init__()
        self.patches, self.calls = patches, 0

    def encode(self, x, ids_keep):
        return x

    def decode(self, ctx, ids_keep, ids_masked, noisy, t):
        self.calls += 1
        return gather_tokens(self.patches, ids_masked)


@pytest.mark.parametrize("kind", ["random", "center"])
def test_video_sampler_with_a_perfect_denoiser_reproduces_the_slices(kind):
    method = build_method(_cfg(**{"diffmae.sample_steps": "10"}), "cpu")
    x = torch.randn(3, 3, 4, 16, 16)
    oracle = Oracle(_slices(x))
    (masked, final), = method.sample(oracle, x, (0,), mask=kind)
    assert oracle.calls == 10 and final.shape == (3, 3, 2, 16, 16)
    assert torch.allclose(final, x[:, :, 0::2], atol=1e-5)
    mk = method.make_mask(kind, 3, 4, frames=2)
    got = _slices(final, 0, 1)  # the returned frames back to slice patches
    assert torch.equal(got[~mk.mask], _slices(x)[~mk.mask])
    assert (_slices(masked, 0, 1)[mk.mask] == 0).all()


def test_video_sampler_with_a_real_model_keeps_visible_slices():
    cfg = _cfg()
    method = build_method(cfg, "cpu")
    model = build_model(cfg.model, cfg.diffmae, 16)
    for p in model.decoder.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 4, 16, 16)
    mk = method.make_mask("random", 2, 4, frames=2)
    final, _ = method.inpaint(model, x, mk, steps=4)
    assert torch.equal(final[~mk.mask], _slices(x)[~mk.mask])
    assert not torch.allclose(final[mk.mask], _slices(x)[mk.mask])


# engine -------------------------------------------------------------------------------------
def test_video_resume_is_bit_exact(tmp_path):
    from ldae_fast.engine import checkpoint as ck
    from ldae_fast.engine.loop import train

    over = {"engine.steps": 4, "data.repeated_aug": 2}
    ref = train(_cfg(tmp_path / "a", **over))
    part = train(_cfg(tmp_path / "b", **{**over, "engine.ckpt_every": 2}))
    shutil.rmtree(tmp_path / "b" / "run" / "checkpoints" / "step_00000004")
    res = train(_cfg(tmp_path / "b", **{**over, "engine.resume": "auto"}))
    assert res.losses == ref.losses[2:] and part.losses == ref.losses
    a, b = ref.model.state_dict(), res.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    st = ck.load_state(res.checkpoint)
    assert st["method"]["time_slice"] == {"tubelet": 2, "slice": 0}
    other = build_method(_cfg(**{"diffmae.time_slice": 1}), "cpu")
    with pytest.raises(ResumeMismatch, match="time_slice"):
        other.prepare(lambda: [], state=st["method"])


# presets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, p", [("diffmae-video-vitl", 16), ("diffmae-video-vitl14", 14)])
def test_video_presets_follow_the_supplement_table_1a(preset, p):
    c = build_config(preset)
    assert c.objective.method == "diffmae" and c.model.size == "L"
    assert (c.diffmae.tubelet, c.model.patch_size, c.diffmae.mask_ratio) == (2, p, 0.9)
    assert c.optim.blr == 8e-4 and c.engine.epochs == 400 and c.optim.clip_grad == 0.02
    assert c.data.repeated_aug == 4 and c.data.source == "wds-video"
    assert c.global_batch(8) == DIFFMAE_VIDEO_GLOBAL_BATCH == 512
    assert (c.optim.beta1, c.optim.beta2, c.optim.weight_decay, c.optim.warmup_epochs) == (0.9, 0.95, 0.05, 40)
    assert c.data.hflip and c.data.crop_min_scale < 1.0 and c.diffmae.num_timesteps == 1000
    assert c.model.num_frames == c.data.num_frames and c.data.num_frames % 2 == 0


def test_video_demo_trains_and_writes_the_video_figure(tmp_path):
    from PIL import Image

    from ldae_fast.train import main
    args = ["--preset", "diffmae-video-demo", f"--engine.out_dir={tmp_path / 'run'}"]
    args += [f"--{k}={v}" for k, v in {**TINY, "eval.figure": "true", "engine.steps": "2",
                                       "diffmae.sample_steps": "3"}.items()]
    assert main(args) == 0
    img = Image.open(tmp_path / "run" / "video_inpainting.png")
    # 4 clips x (original, masked, output) rows of 64 px cells; 2 frame columns (stride 2 of 4).
    assert img.size == (52 + 2 * 64 + 3 * 2, 12 + 2 + 12 * 64 + 13 * 2 + 3 * 4)


def test_an_image_method_refuses_a_video_checkpoints_method_state():
    video = build_method(_cfg(), "cpu").state_dict()
    image = build_method(build_config("diffmae-demo", {"diffmae.mask_ratio": "0.9"}), "cpu")
    with pytest.raises(ResumeMismatch, match="time_slice"):
        image.prepare(lambda: [], state=video)


@pytest.mark.parametrize("preset", ["diffmae-video-demo", "diffmae-video-vitl"])
def test_a_probe_on_clips_is_a_config_error_before_training(preset):
    from ldae_fast.config import ConfigError
    from ldae_fast.train import main
    with pytest.raises(ConfigError, match=r"eval\.probe"):
        build_config(preset, {"eval.probe": "true"})
    assert main(["--preset", preset, "--eval.probe=true", "--engine.steps=1"]) == 2


def test_export_and_eval_of_a_video_checkpoint_are_user_errors(tmp_path, capsys):
    from ldae_fast.cli import main
    from ldae_fast.engine.loop import train
    res = train(_cfg(tmp_path, **{"engine.steps": 1, "engine.ckpt_every": 1}))
    capsys.readouterr()
    assert main(["export", str(res.checkpoint), str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.num_frames=4" in err and "timm" in err
    assert not (tmp_path / "exp").exists()
    assert main(["eval", "--checkpoint", str(res.checkpoint), "--protocols", "knn,finetune"]) == 2
    err = capsys.readouterr().err.strip()
    # finetune takes clips (on clip shards); knn is refused, named, with what a video encoder takes.
    assert "--protocols knn:" in err and "model.num_frames=4" in err and "finetune and figure" in err
