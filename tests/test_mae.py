"""MAE, the third method: one folder plus one registry line. It trains, its loss falls, resume is
exact, its masks are keyed like DiffMAE's, and eval reaches it through the registry."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_runs import tiny_config

from ldae_fast.batch import Batch
from ldae_fast.config import build_config
from ldae_fast.errors import ResumeMismatch
from ldae_fast.methods import METHODS, build_method, build_model, spec_for
from ldae_fast.methods.masking import masked_mse

TINY = {
    "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
    "model.decoder_width": "32", "model.decoder_heads": "2", "data.img_size": "16", "data.batch_size": "8",
    "data.synthetic_images": "64", "engine.kernels": "reference", "engine.log_every": "1",
    "engine.progress": "false", "eval.probe": "false", "eval.figure": "false",
}


def _cfg(tmp_path=None, **over):
    return tiny_config("mae-demo", TINY, tmp_path, **over)


def test_mae_is_registered_with_its_preset():
    c = build_config("mae-demo")
    assert "mae" in METHODS and spec_for(c) is METHODS["mae"] and c.objective.method == "mae"
    assert c.mae.norm_pix_loss and c.model.decoder_width < c.model.width


def test_loss_covers_only_the_masked_patches():
    c = _cfg()
    model, method = build_model(c), build_method(c, "cpu")
    x = torch.randn(4, 3, 16, 16)
    mk = method.draw_mask(4, 16, step=3, micro=0, accum=1)
    pred = model(x, ids_keep=mk.ids_keep).detach()
    target = method.target(x)
    # Any change to the visible patches' predictions leaves the loss as it is.
    edited = torch.where(mk.mask.unsqueeze(-1), pred, pred + 5.0)
    per = (edited - target).square().mean(-1)
    expect = (per * mk.mask).sum() / mk.mask.sum()
    torch.testing.assert_close(masked_mse(edited, target, mk.mask), expect)
    assert int(mk.mask.sum()) == 4 * (16 - int(16 * 0.25))


def test_ranks_and_micro_batches_draw_the_global_batch_masks():
    c = _cfg()
    one = build_method(c, "cpu").draw_mask(8, 16, step=5, micro=0, accum=1)
    halves = [build_method(c, "cpu", rank=r, world_size=2).draw_mask(4, 16, step=5, micro=0, accum=1)
              for r in (0, 1)]
    assert torch.equal(torch.cat([h.ids_keep for h in halves]), one.ids_keep)
    other_step = build_method(c, "cpu").draw_mask(8, 16, step=6, micro=0, accum=1)
    assert not torch.equal(other_step.ids_keep, one.ids_keep)


def test_analytic_flops_match_the_counted_matmuls():
    from torch.utils.flop_counter import FlopCounterMode

    c = _cfg(**{"model.attn_backend": "math"})
    model, method = build_model(c), build_method(c, "cpu")
    x = torch.randn(1, 3, 16, 16)
    mk = method.draw_mask(1, 16, step=0, micro=0, accum=1)
    with FlopCounterMode(display=False) as fc:
        model(x, ids_keep=mk.ids_keep)
    fwd, train = spec_for(c).train_flops(c)
    assert fc.get_total_flops() == fwd and 2 * fwd < train < 3 * fwd
    assert spec_for(c).param_count(c)["total"] == sum(p.numel() for p in model.parameters())


def test_trains_and_the_loss_falls(tmp_path):
    from ldae_fast.engine.loop import train

    res = train(_cfg(tmp_path, **{"engine.steps": 40, "optim.warmup_epochs": 0.5, "optim.blr": 1e-2}))
    losses = [v for _, v in res.losses]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)


def test_resume_is_bit_exact(tmp_path):
    from ldae_fast.engine.loop import train

    ref = train(_cfg(tmp_path / "a", **{"engine.steps": 4}))
    part = train(_cfg(tmp_path / "b", **{"engine.steps": 4, "engine.ckpt_every": 2}))
    shutil.rmtree(tmp_path / "b" / "run" / "checkpoints" / "step_00000004")
    res = train(_cfg(tmp_path / "b", **{"engine.steps": 4, "engine.resume": "auto"}))
    assert res.losses == ref.losses[2:] and part.losses == ref.losses
    a, b = ref.model.state_dict(), res.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Another mask ratio would resume a different run.
    from ldae_fast.engine import checkpoint as ck

    m = build_method(_cfg(**{"mae.mask_ratio": "0.5"}), "cpu")
    with pytest.raises(ResumeMismatch, match="mae.mask_ratio"):
        m.prepare(lambda: [], state=ck.load_state(res.checkpoint)["method"])


def test_eval_probes_and_draws_through_the_registry(tmp_path, capsys):
    from PIL import Image

    from ldae_fast.engine.loop import train
    from ldae_fast.eval import driver

    res = train(_cfg(tmp_path, **{"engine.steps": 2}))
    out = tmp_path / "eval"
    rc = driver.main(["--checkpoint", str(res.checkpoint), "--data", "synthetic", "--max-train-images", "64",
                      "--max-val-images", "32", "--epochs", "2", "--batch-size", "32",
                      "--protocols", "linear-fast,figure", "--out", str(out), "--figure-images", "2"])
    assert rc == 0
    log = capsys.readouterr().out
    assert "probe: clean unmasked input" in log and "sigma" not in log
    rec = json.loads((out / "eval.json").read_text())
    assert {r["encoder"] for r in rec["rows"]} == {"checkpoint", "random init", "pixels", "pixels (PCA 32)"}
    assert all(r["feature_dim"] == 32 for r in rec["rows"] if r["encoder"] != "pixels")
    # 2 images x (random, centre) rows; original / masked / reconstruction columns of 64 px.
    assert Image.open(out / "reconstruction.png").size == (3 * 64 + 4 * 2, 12 + 2 + 4 * 64 + 5 * 2)


def test_method_call_matches_batch_contract():
    c = _cfg()
    model, method = build_model(c), build_method(c, "cpu")
    loss = method(model, Batch(images=torch.randn(8, 3, 16, 16), labels=None), step=0)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("decoder.blocks"))
