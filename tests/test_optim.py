"""optim.name=lamb: timm's Lamb on one device, stepped exactly as a hand-built timm Lamb would be."""

import copy

import pytest
import torch

from ldae_fast.config import build_config

timm_optim = pytest.importorskip("timm.optim")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                               torch.nn.Linear(16, 4))


def _loss(model, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


def test_lamb_single_device_matches_timm_lamb_step_for_step():
    from ldae_fast.engine.loop import SingleDevice

    cfg = build_config("demo", {"optim.name": "lamb", "optim.weight_decay": "0.05", "optim.clip_grad": "0.5",
                                "optim.beta2": "0.99"})
    ours_model, ref_model = _model(), _model()
    backend = SingleDevice(cfg, ours_model, lr=0.0)
    assert type(backend.optimizer) is timm_optim.Lamb

    # The reference, written out: matrices decayed and adapted, 1-D tensors neither; timm's own
    # gradient clipping off because the loop clips first.
    mats = [p for p in ref_model.parameters() if p.ndim > 1]
    vecs = [p for p in ref_model.parameters() if p.ndim <= 1]
    ref = timm_optim.Lamb([{"params": mats, "weight_decay": 0.05, "always_adapt": True},
                           {"params": vecs, "weight_decay": 0.0, "always_adapt": False}],
                          lr=0.0, betas=(0.9, 0.99), eps=1e-6, max_grad_norm=None)
    for step in range(6):
        lr = 0.02 * (step + 1)
        backend.backward(_loss(ours_model, step))
        backend.step(lr)
        _loss(ref_model, step).backward()
        torch.nn.utils.clip_grad_norm_(list(ref_model.parameters()), 0.5)
        for g in ref.param_groups:
            g["lr"] = lr
        ref.step()
        ref.zero_grad(set_to_none=True)
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # Six steps moved the weights: the equality above is not that of two untouched models.
    assert not torch.allclose(ours_model[0].weight, _model()[0].weight, atol=1e-3)


def test_lamb_adapts_weight_matrices_without_weight_decay():
    """The paper's recipe has no weight decay; LAMB must still scale each matrix's step to
    lr x its norm (the trust ratio), or it would be Adam under another name."""
    from ldae_fast.engine.loop import SingleDevice

    cfg = build_config("demo", {"optim.name": "lamb", "optim.weight_decay": "0", "optim.clip_grad": "0"})
    model = _model()
    before = copy.deepcopy(model)
    backend = SingleDevice(cfg, model, lr=0.0)
    backend.backward(_loss(model, 0))
    backend.step(0.01)
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), before.parameters()):
            step = (p - q).abs()
            if p.ndim > 1:
                assert float((p - q).norm() / q.norm()) == pytest.approx(0.01, rel=1e-4), name
            else:  # Adam's first step: each entry moves by lr x |g| / (|g| + eps), just under lr
                assert float(step.max()) <= 0.01 * (1 + 1e-6) and float(step.median()) > 0.0099, name


def test_adamw_stays_the_default_and_lamb_is_told_to_deepspeed():
    from ldae_fast.engine.loop import SingleDevice

    assert type(SingleDevice(build_config("demo"), _model(), 1e-3).optimizer) is torch.optim.AdamW
    ds = pytest.importorskip("ldae_fast.engine.deepspeed_backend")
    c = ds.ds_config(build_config("demo", {"optim.name": "lamb"}), world_size=1, on_cuda=False)
    assert c["zero_allow_untested_optimizer"] is True
    assert "zero_allow_untested_optimizer" not in ds.ds_config(build_config("demo"), 1, False)
