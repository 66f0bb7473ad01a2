"""Config stores intent and derives the rest on every read: a saved config replayed with an
override is the run a fresh command line with that override gives (issue 24's four cases), and
configs saved by older versions (derived values and model.arch stored) still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldae_fast.config import MODEL_SIZES, Config, ConfigError, build_config, parse_cli


def _saved(tmp_path, preset="demo", **over):
    cfg = build_config(preset, {k: str(v) for k, v in over.items()})
    path = tmp_path / "config.json"
    cfg.save(path)
    return path


def _replay(path, *args):
    return parse_cli(["--config", str(path), *args])[0]


def test_model_size_override_gives_that_sizes_dims(tmp_path):
    path = _saved(tmp_path)
    assert json.loads(path.read_text())["model"]["width"] == 0  # intent: "from model.size"
    c = _replay(path, "--model.size=S")
    fresh = build_config("demo", {"model.size": "S"})
    assert (c.model.width, c.model.encoder_depth, c.model.num_heads) == (384, 12, 6)
    assert (c.model.width, c.model.decoder_width, c.model.decoder_heads) == \
        (fresh.model.width, fresh.model.decoder_width, fresh.model.decoder_heads)
    # A width the user set stays theirs.
    assert _replay(_saved(tmp_path, **{"model.width": 48}), "--model.size=S").model.width == 48


def test_synthetic_classes_override_reaches_num_classes(tmp_path):
    path = _saved(tmp_path, **{"ldae.class_cond": "true"})
    assert build_config("demo", {"ldae.class_cond": "true"}).model.num_classes == 8
    assert _replay(path, "--data.synthetic_classes=12").model.num_classes == 12


def test_crop_override_gets_that_crops_scale_and_flip(tmp_path):
    path = _saved(tmp_path, "pca-d32")
    base = _replay(path)
    assert (base.data.crop, base.data.crop_min_scale, base.data.hflip) == ("center", 1.0, False)
    c = _replay(path, "--data.crop=random_resized")
    fresh = build_config("pca-d32", {"data.crop": "random_resized"})
    assert (c.data.crop_min_scale, c.data.hflip) == (fresh.data.crop_min_scale, fresh.data.hflip) == (0.2, True)


def test_method_override_replays_without_model_arch(tmp_path):
    c = _replay(_saved(tmp_path), "--objective.method=diffmae")
    assert c.objective.method == "diffmae" and "arch" not in c.to_dict()["model"]


def test_saved_config_holds_intent_only_and_reads_back_equal(tmp_path):
    cfg = build_config("pca-d32")
    d = cfg.to_dict()
    assert d["model"]["latent_dim"] == 0 and d["data"]["crop_min_scale"] == 0.2
    back = Config.from_dict(d)
    assert back.to_dict() == d and back.model.latent_dim == cfg.model.latent_dim == 32
    assert back.model == cfg.model


def test_an_old_config_with_derived_values_and_model_arch_still_loads(tmp_path):
    old = build_config("pca-d32").to_dict()
    dims = MODEL_SIZES["halfL"]
    old["model"].update(arch="ldae", **dims, decoder_width=dims["width"], decoder_heads=dims["num_heads"],
                        latent_dim=32)
    old["data"].update(crop_min_scale=1.0, hflip=False)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    c = _replay(path, "--model.size=B", "--data.crop=random_resized")
    assert (c.model.width, c.model.decoder_width, c.data.crop_min_scale, c.data.hflip) == (768, 768, 0.2, True)
    assert c.model.latent_dim == 32
    old["model"]["arch"] = "diffmae"
    path.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="model.arch='diffmae' differs from objective.method='ldae'"):
        _replay(path)


# Configs saved by the version before the methods' own sections (written by that code, kept in
# tests/assets): DiffMAE's and MAE's fields then lived in model.* and objective.*.
OLD = Path(__file__).parent / "assets" / "configs_before_method_sections"


def test_configs_saved_before_the_method_sections_load_with_their_values():
    dm = Config.load(OLD / "diffmae-video-demo.json")
    assert (dm.diffmae.mask_ratio, dm.diffmae.rho, dm.diffmae.norm_pix_loss, dm.diffmae.sample_steps,
            dm.diffmae.time_slice, dm.diffmae.decoder_kind, dm.diffmae.decoder_topdown, dm.diffmae.tubelet) \
        == (0.8, 0.6, True, 20, 1, "cross_self", "spread", 2)
    mae = Config.load(OLD / "mae-demo.json")
    assert (mae.objective.method, mae.mae.mask_ratio, mae.mae.norm_pix_loss) == ("mae", 0.6, True)
    ld = Config.load(OLD / "demo-dit.json")
    assert (ld.objective.method, ld.ldae.layout, ld.ldae.adaln_dim) == ("ldae", "dit", 48)
    # Saved again, a config holds each field once, where it lives now, and reads back the same.
    for cfg in (dm, mae, ld):
        d = cfg.to_dict()
        assert not {"mask_ratio", "rho", "norm_pix_loss", "sample_steps", "time_slice"} & set(d["objective"])
        assert not {"decoder_kind", "decoder_topdown", "tubelet", "layout", "adaln_dim", "cond", "class_cond",
                    "label_dropout", "input", "output"} & set(d["model"])
        assert Config.from_dict(d) == cfg
    # A replay of an old file takes the new spelling and the old one alike.
    c = _replay(OLD / "diffmae-video-demo.json", "--diffmae.rho=1.0", "--objective.sample_steps=30")
    assert (c.diffmae.rho, c.diffmae.sample_steps, c.diffmae.decoder_topdown) == (1.0, 30, "spread")


def test_old_command_line_spellings_set_the_fields_where_they_live_now():
    old = parse_cli(["--preset", "diffmae-demo", "--objective.mask_ratio=0.5", "--model.decoder_kind", "cross",
                     "--model.decoder_topdown=spread", "--objective.norm_pix_loss"])[0]
    new = parse_cli(["--preset", "diffmae-demo", "--diffmae.mask_ratio=0.5", "--diffmae.decoder_kind", "cross",
                     "--diffmae.decoder_topdown=spread", "--diffmae.norm_pix_loss"])[0]
    assert old.diffmae == new.diffmae and old.diffmae.norm_pix_loss is True
    # a field two methods took over is set where the running method reads it (the other method's
    # section keeps its default, so the saved config replays); --no- and bare booleans follow the
    # new field's type
    assert old.mae.mask_ratio == 0.75 and old.mae == type(old.mae)()
    assert build_config("mae-demo", {"objective.mask_ratio": "0.5"}).mae.mask_ratio == 0.5
    assert parse_cli(["--preset", "mae-demo", "--no-objective.norm_pix_loss"])[0].mae.norm_pix_loss is False
    with pytest.raises(ConfigError, match="objective.mask_ratio: expected a number"):
        parse_cli(["--objective.mask_ratio=most"])
    with pytest.raises(ConfigError, match=r"diffmae.decoder_kind='nope' is not allowed"):
        parse_cli(["--preset", "diffmae-demo", "--model.decoder_kind=nope"])


# l-DAE's conditioning and input / output fields lived in model.* before they moved to ldae.*.
LDAE_MOVED = {"cond": "none", "class_cond": False, "label_dropout": 0.25, "input": "latent", "output": "latent"}


def test_an_old_config_with_ldaes_model_fields_loads_them_into_its_section(tmp_path):
    old = json.loads((OLD / "demo-dit.json").read_text())
    old["model"].update(LDAE_MOVED)
    old["noise"] = {**old.get("noise", {}), "target": "eps"}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    c = Config.load(path)
    assert {k: getattr(c.ldae, k) for k in LDAE_MOVED} == LDAE_MOVED
    assert c.model.latent_dim == c.tokenizer.latent_dim  # derived from ldae.input / ldae.output
    assert not set(LDAE_MOVED) & set(c.to_dict()["model"])
    # A saved class-conditioned config (the old spelling) still derives its classes, and a new
    # spelling on the command line wins over the file's old one.
    old["model"].update(cond="adaln", class_cond=True)
    path.write_text(json.dumps(old))
    c = _replay(path, "--ldae.label_dropout=0.5")
    assert c.ldae.class_cond and c.model.num_classes == c.data.synthetic_classes and c.ldae.label_dropout == 0.5


def test_old_command_line_spellings_of_ldaes_fields_set_its_section():
    old = parse_cli(["--model.cond", "none", "--model.input=latent", "--model.output=latent", "--noise.target=eps",
                     "--model.label_dropout=0.3"])[0]
    new = parse_cli(["--ldae.cond", "none", "--ldae.input=latent", "--ldae.output=latent", "--noise.target=eps",
                     "--ldae.label_dropout=0.3"])[0]
    assert old.ldae == new.ldae and (old.ldae.cond, old.ldae.input, old.ldae.label_dropout) == ("none", "latent", 0.3)
    assert parse_cli(["--model.class_cond"])[0].ldae.class_cond is True
    with pytest.raises(ConfigError, match=r"ldae.cond='film' is not allowed"):
        parse_cli(["--model.cond=film"])
