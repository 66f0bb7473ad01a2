"""ldae.layout='dit': l-DAE's network as its App. A describes it, DiT cut in two (no class token,
nothing between encoder and decoder, one sigma embedder, adaLN conditioning at width/4), beside
the 'mae' layout it replaces in the paper presets."""

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ldae_fast.config import PRESETS, ConfigError, ModelConfig, build_config
from ldae_fast.methods.ldae.config import LDAEConfig, cond_width
from ldae_fast.methods.ldae.model import build_model, flops_per_image, param_count
from ldae_fast.methods.ldae.trajectory import ROWS
from ldae_fast.models.blocks import Block, FinalLayer, SigmaEmbedder

IMG = 32
PAPER = ("ldae-vitb", "ldae-vithalfl", "ldae-vitl")


_LDAE_FIELDS = ("cond", "class_cond", "label_dropout", "input", "output")


def cfg(layout="dit", **kw):
    """(model section, l-DAE's section): build_model(*cfg(...), IMG)."""
    own = {k: kw.pop(k) for k in _LDAE_FIELDS if k in kw}
    return ModelConfig(**{"size": "tiny", "patch_size": 4, **kw}), LDAEConfig(layout=layout, **own)


def perturbed(model, seed=0):
    """adaLN-Zero and the zero head start as the identity / zeros: give every weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def images(b=2, seed=1):
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _cw(c) -> int:
    return cond_width(c.model.width, c.ldae)


def test_paper_presets_and_trajectory_rows_are_dit_and_the_rest_keep_mae():
    for name in PAPER + tuple(ROWS):
        c = build_config(name)
        assert (c.ldae.layout, _cw(c)) == ("dit", c.model.width // 4), name
    assert _cw(build_config("ldae-vitl")) == 256
    for name in ("demo", "tiny-imagenet"):
        c = build_config(name)
        assert (c.ldae.layout, _cw(c)) == ("mae", c.model.width), name
    # A config stored before the field existed has no layout: it rebuilds as the model it was.
    d = build_config("demo").to_dict()
    del d["ldae"]
    from ldae_fast.config import Config
    assert Config.from_dict(d).ldae.layout == "mae"
    assert all("ldae.layout" not in PRESETS[n] for n in ("demo", "tiny-imagenet"))


def test_layout_validation_names_the_field():
    with pytest.raises(ConfigError, match="ldae.layout='vit'"):
        LDAEConfig(layout="vit")
    with pytest.raises(ConfigError, match="ldae.adaln_dim=-1"):
        LDAEConfig(adaln_dim=-1)
    with pytest.raises(ConfigError, match="ldae.layout='vit'"):
        build_config("demo", {"model.layout": "vit"})  # the old spelling reaches the same check
    with pytest.raises(ConfigError, match="ldae.adaln_dim=0: width/4 is 0 for model.width=3"):
        build_config("demo", {"ldae.layout": "dit", "model.width": "3", "model.num_heads": "1"})
    # l-DAE's section is l-DAE's: another method's saved config that holds the old spelling (a
    # version that wrote the resolved width back stored model.adaln_dim for every run) loads, and
    # leaves it unread; on a command line it is refused, as it would be stored and never read.
    from ldae_fast.config import Config
    saved = build_config("diffmae-demo").to_dict()
    saved["model"]["adaln_dim"] = saved_w = build_config("diffmae-demo").model.width
    back = Config.from_dict(saved)
    assert back.objective.method == "diffmae" and back.ldae.adaln_dim == 0 != saved_w
    with pytest.raises(ConfigError, match=r"--model.adaln_dim: now ldae.adaln_dim, which objective.method='diffmae'"):
        build_config("diffmae-demo", {"model.adaln_dim": str(saved_w)})
    assert cond_width(96, LDAEConfig(layout="dit", adaln_dim=40)) == 40
    assert cond_width(96, LDAEConfig(layout="mae", adaln_dim=24)) == 24


def test_auto_adaln_dim_stays_auto_in_a_saved_config(tmp_path):
    """ldae.adaln_dim=0 is saved as 0, so a reloaded config's c follows a later layout or width;
    an explicit width (a config saved with a number in it) is kept whatever else changes."""
    from ldae_fast.config import parse_cli

    c = build_config("demo", {"ldae.layout": "mae"})
    assert c.ldae.adaln_dim == 0 and _cw(c) == c.model.width == 96
    path = tmp_path / "saved.json"
    c.save(path)
    assert json.loads(path.read_text())["ldae"]["adaln_dim"] == 0

    def c_width(*flags):
        c = parse_cli(["--config", str(path), *flags])[0]
        enc = build_model(c.model, c.ldae, 32).encoder
        assert enc.sigma_embed.mlp[2].out_features == _cw(c)
        return _cw(c), param_count(c.model, c.ldae, 32)["encoder"] == sum(p.numel() for p in enc.parameters())

    assert c_width("--ldae.layout=dit") == (24, True)
    assert c_width("--ldae.layout=dit", "--model.width=192", "--model.num_heads=3") == (48, True)
    assert c_width("--model.width=192", "--model.num_heads=3") == (192, True)
    assert c_width("--ldae.layout=dit", "--ldae.adaln_dim=40") == (40, True)
    # A config that stores a number (written by hand, or resolved by an older version) rebuilds
    # that network: the explicit width outlives a layout or width change.
    d = json.loads(path.read_text())
    d["ldae"]["adaln_dim"] = 96
    path.write_text(json.dumps(d))
    assert c_width() == (96, True)
    assert c_width("--ldae.layout=dit") == (96, True)
    m = ModelConfig(size="tiny", patch_size=4)
    assert flops_per_image(m, LDAEConfig(layout="dit", adaln_dim=40), IMG) > \
        flops_per_image(m, LDAEConfig(layout="dit"), IMG)


def test_dit_modules_no_class_token_no_extra_norm_one_embedder():
    model = build_model(*cfg(class_cond=True, num_classes=5), IMG)
    enc, dec = model.encoder, model.decoder
    names = dict(model.named_parameters())
    assert enc.cls_token is None and not any("cls_token" in n for n in names)
    assert isinstance(enc.norm, nn.Identity) and dec.embed is None and dec.pos_embed is None
    # The only LayerNorms are the adaLN-modulated ones: no affine parameters anywhere.
    assert not any(isinstance(m, nn.LayerNorm) and m.elementwise_affine for m in model.modules())
    embedders = [n for n, m in model.named_modules() if isinstance(m, SigmaEmbedder)]
    assert embedders == ["encoder.sigma_embed"] and dec.sigma_embed is None
    labels = [n for n in names if "label_embed" in n]
    assert labels == ["encoder.label_embed.table.weight"]
    assert enc.label_embed.table.weight.shape == (6, 24)
    # adaLN at width/4: c is 24 wide, every modulation reads 24 and writes 6 (2) x 96.
    assert enc.sigma_embed.mlp[2].out_features == 24
    mods = [m for m in model.modules() if isinstance(m, (Block, FinalLayer))]
    assert len(mods) == 3 + 3 + 1
    for m in mods:
        lin = m.adaLN_modulation[-1]
        assert lin.in_features == 24
        assert lin.out_features == (6 if isinstance(m, Block) else 2) * 96
    # The position code covers the N patch tokens only.
    assert enc.pos_embed.shape == (1, (IMG // 4) ** 2, 96)


def test_mae_layout_keeps_what_dit_drops():
    model = build_model(*cfg("mae"), IMG)
    enc, dec = model.encoder, model.decoder
    assert enc.cls_token is not None and isinstance(enc.norm, nn.LayerNorm) and isinstance(dec.embed, nn.Linear)
    assert [n for n, m in model.named_modules() if isinstance(m, SigmaEmbedder)] == [
        "encoder.sigma_embed", "decoder.sigma_embed"]
    assert all(m.adaLN_modulation[-1].in_features == 96 for m in model.modules()
               if isinstance(m, (Block, FinalLayer)))


def test_dit_forward_is_one_sequence_through_both_halves():
    """Written out by hand: patches + position -> every block, encoder then decoder, on one c ->
    final layer. Nothing else sits between the halves."""
    model = perturbed(build_model(*cfg(), IMG)).eval()
    enc, dec = model.encoder, model.decoder
    x, s = images(), torch.tensor([0.1, 0.9])
    with torch.no_grad():
        c = enc.sigma_embed(s)
        t = enc.patch_embed(x) + enc.pos_embed
        for blk in list(enc.blocks) + list(dec.blocks):
            t = blk(t, c)
        from ldae_fast.reference import unpatchify
        want = unpatchify(dec.final_layer(t, c), 4, IMG, IMG, 3)
        torch.testing.assert_close(model(x, s), want, rtol=0, atol=0)
        # The features are the encoder's block output as it is, averaged over all N tokens.
        tok = enc.forward_features(x)
        assert tok.shape == (2, 64, 96)
        torch.testing.assert_close(enc.pooled(x), tok.mean(1))
        # Probe at depth k: the mean after the first k blocks, with no norm.
        t1 = enc.blocks[0](enc.patch_embed(x) + enc.pos_embed, enc.sigma_embed(torch.zeros(2)))
        torch.testing.assert_close(enc.pooled(x, depth=1), t1.mean(1))
        with pytest.raises(ValueError, match="pool='cls' needs a class token"):
            enc.pooled(x, "cls")
        with pytest.raises(ValueError, match="pass c"):
            dec(tok)


def test_probe_past_the_cut_reads_the_decoders_first_blocks():
    """l-DAE App. A probes DiT-L at block k of its 24: in the dit layout k may pass the encoder, and
    the features are the mean of the tokens after encoder blocks + the decoder's first k - L_e."""
    from ldae_fast.eval.features import probe_encoder, probe_view
    from ldae_fast.methods.ldae.probe import DitPrefix

    model = perturbed(build_model(*cfg(), IMG)).eval()
    enc, dec = model.encoder, model.decoder
    x, s = images(), 0.3
    c_full = build_config("demo", {"ldae.layout": "dit", "eval.probe_depth": "6", "eval.probe_sigma": str(s)})
    seen = {}
    hook = dec.final_layer.register_forward_pre_hook(lambda m, a: seen.update(t=a[0]))
    with torch.no_grad():
        model(x, torch.full((2,), s))
        hook.remove()
        # k = all 6 blocks: exactly the tokens the final layer reads.
        view = probe_view(probe_encoder(model, c_full), c_full)
        torch.testing.assert_close(view.pooled(x), seen["t"].mean(1), rtol=0, atol=1e-6)
        # k = 4: three encoder blocks, then the decoder's first, on the same c.
        c4 = build_config("demo", {"ldae.layout": "dit", "eval.probe_depth": "4"})
        p4 = probe_encoder(model, c4)
        assert isinstance(p4, DitPrefix) and len(p4.blocks) == 1 and p4.blocks[0] is dec.blocks[0]
        t, c = enc.encode(x)
        torch.testing.assert_close(p4.pooled(x), dec.blocks[0](t, c).mean(1))
        # Within the encoder the encoder itself answers.
        assert probe_encoder(model, build_config("demo", {"ldae.layout": "dit", "eval.probe_depth": "3"})) is enc
    # The config refuses what the network lacks; the mae layout stops at its encoder.
    with pytest.raises(ConfigError, match=r"eval.probe_depth=7 is deeper than the 6 blocks"):
        build_config("demo", {"ldae.layout": "dit", "eval.probe_depth": "7"})
    with pytest.raises(ConfigError, match=r"eval.probe_depth=4 is deeper than the 3 blocks"):
        build_config("demo", {"eval.probe_depth": "4"})
    # A depth that bypassed the config (eval's --probe-depth) is an error, not a silent 'all blocks'.
    mae_model = build_model(*cfg("mae"), IMG)
    bad = build_config("demo")
    bad.eval.probe_depth = 5  # set after validation, as a flag that skips it would
    with pytest.raises(ValueError, match="only the 'dit' layout continues"):
        probe_encoder(mae_model, bad)


@pytest.mark.parametrize("layout", ["dit", "mae"])
@pytest.mark.parametrize("kw", [{}, {"cond": "none"}, {"class_cond": True, "num_classes": 10},
                                {"input": "latent", "output": "latent", "latent_dim": 8}])
def test_param_count_is_the_built_models(layout, kw):
    for size, patch, img in (("tiny", 4, 32), ("S", 8, 64)):
        c = cfg(layout, size=size, patch_size=patch, **kw)
        m = build_model(*c, img)
        counts = param_count(*c, img)
        assert counts["encoder"] == sum(p.numel() for p in m.encoder.parameters()), (size, kw)
        assert counts["total"] == sum(p.numel() for p in m.parameters()), (size, kw)


@pytest.mark.parametrize("size", ["halfL", "L"])
def test_param_count_paper_sizes_on_meta(size):
    """The table's sizes, built on the meta device (no memory): the analytic counts are exact,
    and the dit layout saves what its adaLN, class token, norm, embedding and embedder cost."""
    counts = {}
    for layout in ("dit", "mae"):
        c = ModelConfig(size=size, patch_size=16), LDAEConfig(layout=layout)
        with torch.device("meta"):
            m = build_model(*c, 256)
        counts[layout] = param_count(*c, 256)["total"]
        assert counts[layout] == sum(p.numel() for p in m.parameters())
    w, L = 1024, ModelConfig(size=size).encoder_depth * 2
    a = w // 4
    saved = (L * 6 * w * (w - a) + 2 * w * (w - a)  # adaLN block + final modulations
             + w + 2 * w + (w * w + w)  # class token, encoder norm, decoder embedding
             + 2 * (256 * w + w * w + 2 * w) - (256 * a + a * a + 2 * a))  # two full embedders -> one small
    assert counts["mae"] - counts["dit"] == saved


@pytest.mark.parametrize("kw", [{}, {"cond": "none"}, {"class_cond": True, "num_classes": 4}])
def test_flops_formula_counts_every_matmul_dit(kw):
    c = cfg(attn_backend="math", encoder_depth=2, decoder_depth=1, **kw)
    model = build_model(*c, IMG)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images(), torch.tensor([0.1, 0.2]), **({"labels": torch.tensor([0, 1])} if kw.get("class_cond") else {}))
    assert counter.get_total_flops() / 2 == flops_per_image(*c, IMG)


def test_train_flops_dit_below_mae():
    from ldae_fast.methods.ldae.flops import train_flops_per_image

    dit, mae = (train_flops_per_image(ModelConfig(size="L", patch_size=16), LDAEConfig(layout=lay), 256)
                for lay in ("dit", "mae"))
    assert dit[1] == 3 * dit[0] and dit[0] < mae[0]
    # The class token's share: one of 257 tokens in every block, plus the decoder embedding.
    assert 0.99 < dit[0] / mae[0] < 0.997


TINY = {
    "ldae.layout": "dit", "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "2",
    "model.decoder_depth": "1", "data.img_size": "16", "data.batch_size": "8", "data.synthetic_images": "32",
    "tokenizer.fit_images": "16", "engine.kernels": "reference", "engine.log_every": "2",
    "engine.progress": "false", "engine.steps": "3", "eval.probe": "false", "eval.figure": "false",
    "optim.warmup_epochs": "0",
}


def test_train_save_reload_eval_and_export_round_trip(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    from ldae_fast.engine.checkpoint import load_state
    from ldae_fast.engine.loop import train
    from ldae_fast.eval.export import main as export_main
    from ldae_fast.eval.features import extract_features, probe_view
    from ldae_fast.eval.reader import load_exported_encoder, load_for_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = build_config("demo", {**TINY, "engine.out_dir": str(tmp_path / "run")})
    res = train(c)
    st = load_state(res.checkpoint)
    assert st["config"]["ldae"]["layout"] == "dit" and st["config"]["ldae"]["adaln_dim"] == 0
    assert not any("cls_token" in k or k.startswith("decoder.sigma_embed") for k in st["model"])
    cfg2, model, method = load_for_eval(res.checkpoint, use_ema=False)
    assert cfg2.ldae.layout == "dit" and model.encoder.cls_token is None
    assert _cw(cfg2) == 8 == model.encoder.sigma_embed.mlp[2].out_features
    # Reload rebuilt the trained network exactly: the weights, and a forward pass, are the run's.
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, st["model"][k], rtol=0, atol=0)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert model(x, torch.full((5,), 0.5)).shape == x.shape
    view = probe_view(model.encoder, cfg2, method)
    feats = extract_features(view, x, batch_size=2)
    with torch.no_grad():
        want = model.encoder.forward_features(x, sigma=view.sigma).mean(1)
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)

    out = tmp_path / "enc"
    assert export_main([str(res.checkpoint), str(out), "--no-ema"]) == 0
    args = json.loads((out / "config.json").read_text())["model_args"]
    assert args["class_token"] is False and args["final_norm"] is False and args["global_pool"] == "avg"
    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # strict load
    assert vit.cls_token is None and isinstance(vit.norm, nn.Identity) and isinstance(vit.fc_norm, nn.Identity)
    with torch.no_grad():
        ours = model.encoder.forward_features(x)
        torch.testing.assert_close(vit.forward_features(x), ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vit(x), ours.mean(1), rtol=1e-5, atol=1e-5)
        _, enc, _ = load_exported_encoder(out)
        torch.testing.assert_close(extract_features(enc.encoder, x), ours.mean(1), rtol=1e-5, atol=1e-5)
        # Fine-tuning from the export gets the same fresh norm after the pool as from the checkpoint.
        from ldae_fast.eval.finetune import build_finetune_model
        ft = build_finetune_model(enc.encoder, num_classes=3, drop_path=0.0).eval()
        assert isinstance(ft.fc_norm, nn.LayerNorm) and isinstance(vit.fc_norm, nn.Identity)
        torch.testing.assert_close(ft.forward_head(ft.forward_features(x), pre_logits=True),
                                   nn.functional.layer_norm(ours.mean(1), (32,), eps=1e-6), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="needs a class token"):
            enc.encoder.pooled(x, "cls")


def test_timm_export_folds_sigma_and_refuses_token_pool():
    timm = pytest.importorskip("timm")
    from ldae_fast.models.timm_export import timm_kwargs, timm_state_dict

    enc = perturbed(build_model(*cfg(class_cond=True, num_classes=3), IMG), seed=3).encoder.eval()
    tm = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_kwargs(enc)).eval()
    tm.load_state_dict(timm_state_dict(enc, sigma=0.4), strict=True)
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(tm.forward_features(x), enc.forward_features(x, 0.4), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tm(x), enc.pooled(x, sigma=0.4), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="global_pool='token' needs a class token"):
        timm_kwargs(enc, "token")


def test_finetune_model_from_a_dit_encoder():
    pytest.importorskip("timm")
    from ldae_fast.eval.finetune import build_finetune_model

    enc = perturbed(build_model(*cfg(), IMG), seed=5).encoder.eval()
    ft = build_finetune_model(enc, num_classes=4, drop_path=0.0).eval()
    # MAE's fine-tuning head on an encoder with no norm of its own: a fresh LayerNorm after the
    # average pool, at timm's identity init, then the classifier.
    assert isinstance(ft.norm, nn.Identity) and isinstance(ft.fc_norm, nn.LayerNorm)
    assert torch.equal(ft.fc_norm.weight, torch.ones(96)) and torch.equal(ft.fc_norm.bias, torch.zeros(96))
    x = images()
    with torch.no_grad():
        want = nn.functional.layer_norm(enc.pooled(x), (96,), eps=1e-6)
        torch.testing.assert_close(ft.forward_head(ft.forward_features(x), pre_logits=True),
                                   want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ft(x), ft.head(want), atol=1e-5, rtol=1e-5)
    # It trains: the norm's parameters are the fine-tuned model's, and get gradients.
    ft.train()
    ft(x).sum().backward()
    assert ft.fc_norm.weight.grad is not None and ft.fc_norm.weight.grad.abs().sum() > 0
    # 'mae' keeps its pretrained norm before the pool and adds none after it.
    ft_mae = build_finetune_model(build_model(*cfg("mae"), IMG).encoder, num_classes=4, drop_path=0.0)
    assert isinstance(ft_mae.norm, nn.LayerNorm) and isinstance(ft_mae.fc_norm, nn.Identity)


def _out_and_grads(model, x, s, labels):
    model.zero_grad(set_to_none=True)
    out = model(x, s, labels=labels)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["checkpointing", "compile-eager", "compile-aot_eager",
                                     "compile-aot_eager+checkpointing"])
def test_compile_and_checkpointing_match_plain_eager(variant):
    """Regional compilation and activation checkpointing change how the dit layout runs, not what
    it computes: the output and every parameter's gradient (the shared sigma and label embedders'
    included, whose c every block reads) equal plain eager's."""
    from ldae_fast.models.compile import compile_blocks

    torch._dynamo.reset()
    c = cfg(class_cond=True, num_classes=3)
    plain = perturbed(build_model(*c, IMG), seed=7)
    x, s, labels = images(), torch.tensor([0.3, 0.6]), torch.tensor([2, 0])
    want, want_g = _out_and_grads(plain, x, s, labels)
    assert all(g is not None and g.abs().sum() > 0 for g in want_g.values()), \
        [n for n, g in want_g.items() if g is None or not g.abs().sum()]

    model = build_model(*c, IMG)
    model.load_state_dict(plain.state_dict())
    if "checkpointing" in variant:
        model.set_grad_checkpointing(True)
        assert all(b.grad_checkpointing for b in list(model.encoder.blocks) + list(model.decoder.blocks))
    if variant.startswith("compile"):
        backend = variant.split("-")[1].split("+")[0]
        assert compile_blocks(model, backend=backend) == 6
    got, got_g = _out_and_grads(model, x, s, labels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got_g.keys() == want_g.keys()
    for n, g in want_g.items():
        torch.testing.assert_close(got_g[n], g, rtol=0, atol=1e-6, msg=n)
    torch._dynamo.reset()


def test_docs_table_is_the_codes():
    """docs/model.md's parameter / FLOP table, row by row, is what the code computes now."""
    from pathlib import Path

    from ldae_fast.methods.ldae.flops import train_flops_per_image

    text = (Path(__file__).resolve().parents[1] / "docs" / "model.md").read_text()
    for size in ("halfL", "L"):
        for layout in ("dit", "mae"):
            m, net = ModelConfig(size=size, patch_size=16), LDAEConfig(layout=layout)
            pc, (fwd, tr) = param_count(m, net, 256), train_flops_per_image(m, net, 256)
            row = (f"| {size} | {layout} | {cond_width(m.width, net)} | {pc['encoder'] / 1e6:.1f} | {pc['total'] / 1e6:.1f} | "
                   f"{fwd / 1e9:.1f} | {tr / 1e9:.1f} |")
            assert row in text, row


def test_eval_driver_on_a_dit_checkpoint(tmp_path, capsys):
    """`ldae-fast eval` end to end on a dit checkpoint: probe, kNN, fine-tune and the denoising
    figure all run on an encoder with no class token."""
    from ldae_fast.engine.loop import train
    from ldae_fast.eval import driver

    res = train(build_config("demo", {**TINY, "engine.out_dir": str(tmp_path / "run")}))
    out = tmp_path / "eval"
    rc = driver.main(["--checkpoint", str(res.checkpoint), "--data", "synthetic", "--max-train-images", "64",
                      "--max-val-images", "32", "--epochs", "1", "--batch-size", "32", "--finetune-steps", "1",
                      "--finetune-batch-size", "16", "--num-workers", "0", "--knn-k", "5", "--no-baseline",
                      "--protocols", "linear-fast,knn,finetune,figure", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert {r["protocol"].split(" ")[0] for r in rows} >= {"knn", "finetune"}
    assert all(r["feature_dim"] == 32 for r in rows if not r["encoder"].startswith("pixels"))
    assert (out / "denoising.png").is_file()
    # --probe-depth past the cut (2 encoder + 1 decoder blocks): 3 probes, 4 is refused in one line.
    small = ["--checkpoint", str(res.checkpoint), "--data", "synthetic", "--max-train-images", "32",
             "--max-val-images", "16", "--epochs", "1", "--batch-size", "16", "--num-workers", "0",
             "--knn-k", "5", "--no-baseline", "--protocols", "knn"]
    assert driver.main(small + ["--probe-depth", "3", "--out", str(tmp_path / "e3")]) == 0
    assert driver.main(small + ["--probe-depth", "4", "--out", str(tmp_path / "e4")]) == 2
    assert "eval.probe_depth=4 is deeper than the 3 blocks" in capsys.readouterr().err


def test_fused_adaln_dit_matches_unfused(kernel_device):
    """The fused LayerNorm + modulate kernel (interpreted on CPU) reads shift / scale of width
    `width` whatever c's width: the dit model gives the same outputs and gradients through it."""
    device = kernel_device
    plain = perturbed(build_model(*cfg(encoder_depth=1, decoder_depth=1), IMG)).to(device)
    fused = build_model(*cfg(encoder_depth=1, decoder_depth=1, fused_adaln=True), IMG, kernels="triton").to(device)
    assert fused.decoder.final_layer.norm_modulate.on[torch.device(device).type], "the kernel must run here"
    fused.load_state_dict(plain.state_dict())
    x, s = images().to(device), torch.tensor([0.3, 1.2], device=device)
    outs, grads = [], []
    for m in (plain, fused):
        y = m(x, s)
        y.square().mean().backward()
        outs.append(y)
        grads.append({k: p.grad for k, p in m.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-5, msg=k)
