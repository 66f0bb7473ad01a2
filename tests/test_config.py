import json

import pytest

from ldae_fast.config import PRESETS, Config, ConfigError, build_config, parse_cli


def _preset_params():
    from ldae_fast.tokenizers import TOKENIZERS

    for name, p in PRESETS.items():
        kind = p.get("tokenizer.kind", "pca")
        yield pytest.param(name, marks=pytest.mark.skip(reason=f"tokenizer kind {kind!r} is not registered")
                           ) if kind not in TOKENIZERS else name


@pytest.mark.parametrize("preset", list(_preset_params()))
def test_presets_build_and_roundtrip(preset, tmp_path):
    cfg = build_config(preset)
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["preset"] == preset


def test_paper_recipes():
    for name, size, width, depth in [("ldae-vitb", "B", 768, 12), ("ldae-vithalfl", "halfL", 1024, 12),
                                     ("ldae-vitl", "L", 1024, 24)]:
        c = build_config(name)
        assert (c.model.size, c.model.width, c.model.encoder_depth, c.model.decoder_depth) == (size, width, depth, depth)
        assert c.model.patch_size == 16 and c.data.img_size == 256
        assert c.optim.weight_decay == 0 and c.engine.epochs == 400 and c.optim.warmup_epochs == 100
        # global batch 2048 on 8 ranks: lr = 1e-4 * 2048 / 256
        assert c.global_batch(8) == 2048 and c.lr(8) == pytest.approx(8e-4)
        assert c.total_steps(8) == 400 * 1_281_167 // 2048


@pytest.mark.parametrize("overrides,match", [
    ({"tokenizer.latent_dim": "49"}, "larger than 3\\*p\\^2=48"),
    ({"data.img_size": "30"}, "not divisible by model.patch_size=4"),
    ({"ldae.cond": "film"}, "choose one of adaln, none"),
    ({"engine.kernels": "cuda"}, "choose one of auto, triton, reference"),
    ({"model.num_heads": "5"}, "divisible by model.num_heads"),
    ({"engine.steps": "ten"}, "engine.steps: expected an integer"),
    ({"model.nope": "1"}, "unknown field 'nope' in section 'model'"),
    ({"nope.x": "1"}, "unknown config section 'nope'"),
    ({"engine.progress": "maybe"}, "expected a boolean"),
    ({"engine.compile_mode": "fast"}, "choose one of default, reduce-overhead, max-autotune"),
    ({"engine.compile": "true", "engine.compile_mode": "max-autotune", "engine.grad_accum": "2"},
     "records CUDA graphs, which this trainer does not combine with engine.grad_accum=2"),
])
def test_bad_values_raise_clear_messages(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config("demo", overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; known presets: demo"):
        build_config("huge")


def test_cli_overrides_and_aliases(tmp_path):
    cfg, rest = parse_cli(["--preset", "tiny-imagenet", "--optim.blr=3e-4", "--ldae.cond", "none",
                           "--kernels", "reference", "--engine.progress=false", "--extra"])
    assert cfg.preset == "tiny-imagenet" and cfg.optim.blr == 3e-4 and cfg.ldae.cond == "none"
    assert cfg.engine.kernels == "reference" and cfg.engine.progress is False and rest == ["--extra"]
    cfg.save(tmp_path / "c.json")
    cfg2, _ = parse_cli(["--config", str(tmp_path / "c.json"), "--engine.seed=5"])
    assert cfg2.engine.seed == 5 and cfg2.optim.blr == 3e-4 and cfg2.preset == "tiny-imagenet"
