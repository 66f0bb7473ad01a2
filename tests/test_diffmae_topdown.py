"""DiffMAE's top-down decoder wiring (diffmae.decoder_topdown): which encoder block each decoder
block reads, that gradients reach each connected block directly, that a config saved before the
field existed rebuilds the network it trained, and the FLOPs of the new decoders."""

import pytest
import torch

from ldae_fast.config import Config, ConfigError, build_config
from ldae_fast.methods.diffmae.model import build_diffmae as build_model
from ldae_fast.methods.diffmae.model import topdown_sources
from ldae_fast.methods.masking import random_masking

SMALL = {"model.width": "32", "model.num_heads": "2", "model.decoder_heads": "2", "data.img_size": "16",
         "model.attn_backend": "math", "engine.kernels": "reference"}


def _model(kind, topdown, enc, dec):
    cfg = build_config("diffmae-demo", {**SMALL, "diffmae.decoder_kind": kind, "diffmae.decoder_topdown": topdown,
                                        "model.encoder_depth": str(enc), "model.decoder_depth": str(dec)})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffmae, 16)
    # adaLN-Zero gates and the zero head would hide every path from the output: open them.
    for p in model.decoder.parameters():
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return cfg, model


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = random_masking(2, 16, 0.75, seed=seed, step=0)
    return (torch.randn(2, 3, 16, 16, generator=g), mk, torch.randn(2, 12, 48, generator=g),
            torch.tensor([3, 700]))


def test_sources_of_each_mode():
    assert topdown_sources("last", 4, 3) == (3, 3, 3)
    assert topdown_sources("deepest_first", 4, 4) == (3, 2, 1, 0)
    assert topdown_sources("deepest_first", 3, 5) == (2, 1, 0, 0, 0)  # clamped
    assert topdown_sources("deepest_first", 12, 8) == (11, 10, 9, 8, 7, 6, 5, 4)
    assert topdown_sources("spread", 12, 8) == (11, 10, 8, 7, 5, 4, 2, 1)
    assert topdown_sources("spread", 24, 8) == (23, 20, 17, 14, 11, 8, 5, 2)
    assert topdown_sources("spread", 4, 4) == topdown_sources("deepest_first", 4, 4)
    for enc, dec in ((12, 8), (3, 5), (24, 24), (1, 2)):
        s = topdown_sources("spread", enc, dec)
        assert s[0] == enc - 1 and all(a >= b for a, b in zip(s, s[1:])) and min(s) >= 0


@pytest.mark.parametrize("kind", ["cross", "cross_self"])
@pytest.mark.parametrize("topdown,enc,dec", [("deepest_first", 3, 3), ("deepest_first", 3, 4),
                                             ("spread", 4, 2), ("last", 3, 2)])
def test_each_decoder_block_attends_to_its_encoder_block(kind, topdown, enc, dec):
    _, model = _model(kind, topdown, enc, dec)
    want = topdown_sources(topdown, enc, dec)
    assert model.decoder.sources == want
    x, mk, noisy, t = _inputs()
    enc_out, ctx_in = {}, {}
    for j, blk in enumerate(model.encoder.blocks):
        blk.register_forward_hook(lambda m, a, out, j=j: enc_out.__setitem__(j, out))
    model.encoder.norm.register_forward_hook(lambda m, a, out: enc_out.__setitem__("norm", out))
    for i, blk in enumerate(model.decoder.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: ctx_in.__setitem__(i, a[1]))
    model(x, ids_keep=mk.ids_keep, ids_masked=mk.ids_masked, noisy=noisy, t=t)
    pos = model.decoder.pos_embed
    B = x.shape[0]
    pos_vis = torch.cat([pos[:, :1].expand(B, -1, -1),
                         torch.gather(pos[:, 1:].expand(B, -1, -1), 1,
                                      mk.ids_keep.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))], 1)
    for i, j in enumerate(want):
        # The final block is read after the encoder's norm, as the decoder always read it.
        src = enc_out["norm"] if j == enc - 1 else enc_out[j]
        if topdown == "last":
            expect = model.decoder.enc_proj(src) + pos_vis
        else:
            dec_ = model.decoder
            expect = dec_.ctx_projs[i](dec_.ctx_norms[i](src)) + pos_vis
        assert torch.allclose(ctx_in[i], expect, atol=1e-6), (i, j)
        # ... and no other encoder block's output would give it.
        for other in range(enc - 1):
            if other != j and topdown != "last":
                wrong = model.decoder.ctx_projs[i](model.decoder.ctx_norms[i](enc_out[other])) + pos_vis
                assert not torch.allclose(ctx_in[i], wrong, atol=1e-4)


@pytest.mark.parametrize("kind", ["cross", "cross_self"])
@pytest.mark.parametrize("topdown", ["deepest_first", "spread", "last"])
def test_gradients_reach_every_connected_encoder_block_directly(kind, topdown):
    """Cut the encoder's own chain (each block's input detached from the block below): a gradient
    then reaches block j's output only through a decoder block that reads it."""
    enc, dec = 4, 3
    _, model = _model(kind, topdown, enc, dec)
    x, mk, noisy, t = _inputs(1)
    outs = {}

    def keep(j):
        def hook(module, args, out):
            out.retain_grad()
            outs[j] = out
        return hook

    for j, blk in enumerate(model.encoder.blocks):
        blk.register_forward_pre_hook(lambda m, a: (a[0].detach(),) + tuple(a[1:]))
        blk.register_forward_hook(keep(j))
    model(x, ids_keep=mk.ids_keep, ids_masked=mk.ids_masked, noisy=noisy, t=t).square().sum().backward()
    connected = set(topdown_sources(topdown, enc, dec))
    for j in range(enc):
        g = outs[j].grad
        if j in connected:
            assert g is not None and g.abs().sum() > 0, j
        else:
            assert g is None or g.abs().sum() == 0, j
        # every encoder block's weights get a gradient only if something downstream reads it
        w = model.encoder.blocks[j].mlp.fc2.weight.grad
        assert (w is not None and w.abs().sum() > 0) == (j in connected), j
    if topdown != "last":
        assert connected == set(model.decoder.encoder_blocks_read)


def test_sampler_reads_the_same_top_down_context():
    """encode once, decode per step (the inpainting loop) gives what one forward gives."""
    _, model = _model("cross_self", "spread", 4, 3)
    x, mk, noisy, t = _inputs(2)
    ctx = model.encode(x, mk.ids_keep)
    assert isinstance(ctx, tuple) and len(ctx) == 4
    a = model.decode(ctx, mk.ids_keep, mk.ids_masked, noisy, t)
    b = model(x, ids_keep=mk.ids_keep, ids_masked=mk.ids_masked, noisy=noisy, t=t)
    assert torch.equal(a, b)


def test_joint_with_a_top_down_wiring_is_a_config_error():
    with pytest.raises(ConfigError, match="diffmae.decoder_topdown"):
        build_config("diffmae-demo", {"diffmae.decoder_topdown": "spread"})
    with pytest.raises(ConfigError, match="diffmae.decoder_topdown"):
        build_config("diffmae-demo", {"diffmae.decoder_kind": "cross", "diffmae.decoder_topdown": "bottom_up"})


def _old_layout(d: dict) -> dict:
    """A config dict laid out as versions before the diffmae section saved it (its fields in the
    model and objective sections)."""
    import json

    from ldae_fast.methods.diffmae.config import RENAMED

    d = json.loads(json.dumps(d))
    dm = d.pop("diffmae")
    for old, new in RENAMED.items():
        sec, name = old.split(".")
        d[sec][name] = dm[new.split(".")[1]]
    return d


def test_a_config_saved_without_the_field_rebuilds_as_it_was(tmp_path):
    """A checkpoint written before diffmae.decoder_topdown existed stores a cross_self decoder that
    read the encoder's final output: it must rebuild so, and its weights load strictly."""
    cfg = build_config("diffmae-demo", {**SMALL, "diffmae.decoder_kind": "cross_self", "model.decoder_depth": "2"})
    from ldae_fast.config import sanitize_stored_config

    old = _old_layout(cfg.to_dict())
    del old["model"]["decoder_topdown"]
    # load_for_eval's path for a checkpoint's stored config
    again = Config.from_dict(sanitize_stored_config(old, "an old checkpoint"))
    assert again.diffmae.decoder_topdown == "last" and again.diffmae.decoder_kind == "cross_self"
    torch.manual_seed(0)
    before = build_model(cfg.model, cfg.diffmae, 16)
    after = build_model(again.model, again.diffmae, 16)
    after.load_state_dict(before.state_dict(), strict=True)
    assert "decoder.enc_proj.weight" in before.state_dict()
    # The old default decoder kind is kept too: a stored config without decoder_kind is joint.
    del old["model"]["decoder_kind"]
    assert Config.from_dict(old).diffmae.decoder_kind == "joint"


def test_paper_presets_default_to_the_cross_self_top_down_decoder():
    for preset in ("diffmae-vitb", "diffmae-vitl", "diffmae-vith", "diffmae-video-vitl"):
        m = build_config(preset).diffmae
        assert (m.decoder_kind, m.decoder_topdown) == ("cross_self", "deepest_first"), preset
    # joint and the others stay selectable on the same preset
    m = build_config("diffmae-vitb", {"diffmae.decoder_kind": "joint", "diffmae.decoder_topdown": "last"}).diffmae
    assert m.decoder_kind == "joint"


@pytest.mark.parametrize("kind,topdown", [("cross", "deepest_first"), ("cross_self", "spread"),
                                          ("cross_self", "last")])
def test_training_flops_of_top_down_decoders_match_the_counter(kind, topdown):
    from torch.utils.flop_counter import FlopCounterMode

    from ldae_fast.methods.diffmae.flops import diffmae_train_flops_per_image
    cfg, model = _model(kind, topdown, 3, 2)
    x, mk, noisy, t = _inputs()
    with FlopCounterMode(display=False) as fc:
        model(x, ids_keep=mk.ids_keep, ids_masked=mk.ids_masked, noisy=noisy, t=t).sum().backward()
    fwd, total = diffmae_train_flops_per_image(cfg.model, cfg.diffmae, 16, 0.75)
    assert fc.get_total_flops() == 2 * total  # two images
    # each decoder block projects what it reads: a top-down wiring costs (L_d - 1) projections more
    last = build_config("diffmae-demo", {**SMALL, "diffmae.decoder_kind": kind, "model.encoder_depth": "3",
                                         "model.decoder_depth": "2"})
    extra = 0 if topdown == "last" else (2 - 1) * 2 * (1 + 4) * 32 * 32
    assert fwd == diffmae_train_flops_per_image(last.model, last.diffmae, 16, 0.75)[0] + extra


def test_resuming_with_another_decoder_wiring_is_refused():
    from ldae_fast.engine.guard import model_shape_diff

    cfg = build_config("diffmae-vitb")
    old = build_config("diffmae-vitb", {"diffmae.decoder_kind": "cross_self", "diffmae.decoder_topdown": "last"}).to_dict()
    assert model_shape_diff(old, cfg) == ["diffmae.decoder_topdown last -> deepest_first"]
    old = _old_layout(old)  # saved before the diffmae section ...
    assert model_shape_diff(old, cfg) == ["diffmae.decoder_topdown last -> deepest_first"]
    del old["model"]["decoder_topdown"]  # ... and before the field: it was 'last'
    assert model_shape_diff(old, cfg) == ["diffmae.decoder_topdown last -> deepest_first"]
    assert model_shape_diff(cfg.to_dict(), cfg) == []
