"""The config mechanism's registries: methods and data sources register into it; it imports neither."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ldae_fast import config_registry
from ldae_fast.config import Config, ConfigError, build_config
from ldae_fast.data.registry import SOURCES as DATA_SOURCES
from ldae_fast.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_a_config_built_before_the_methods_registered_fails_loudly():
    code = ("from ldae_fast.config import RegistryNotLoaded, build_config\n"
            "try:\n    build_config('demo')\nexcept RegistryNotLoaded as e:\n    print('refused:', e)\n"
            "import ldae_fast.methods\nprint('noise' in build_config('demo').to_dict())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "refused: no method and no data source is registered" in out and "import ldae_fast.methods" in out
    assert out.strip().endswith("True")


def test_every_method_registered_its_sections_and_presets():
    assert set(config_registry.METHODS) == set(METHODS)
    for spec in METHODS.values():
        for name, typ in spec.sections.items():
            assert Config.sections()[name] is typ
            assert isinstance(getattr(build_config("demo"), name), typ)
        assert set(spec.presets) <= set(config_registry.PRESETS)


def test_data_source_is_checked_against_the_source_registry():
    assert set(config_registry.SOURCES) == set(DATA_SOURCES)
    with pytest.raises(ConfigError, match="data.source='nope' is not allowed; choose one of " +
                       ", ".join(DATA_SOURCES)):
        build_config("demo", {"data.source": "nope"})
    # A sharded source needs data.epoch_size, read from its registry entry.
    with pytest.raises(ConfigError, match="needs data.epoch_size"):
        build_config("demo", {"data.source": "resident"})


def test_a_registered_source_is_accepted_and_its_kind_is_read(monkeypatch):
    monkeypatch.setitem(config_registry.SOURCES, "lmdb",
                        config_registry.SourceKind("lmdb", sharded=True, images=True, video=False))
    cfg = build_config("demo", {"data.source": "lmdb", "data.epoch_size": "10"})
    assert cfg.data.source == "lmdb"
    with pytest.raises(ConfigError, match=r"data.num_frames=4: clips .* data.source='wds-video'"):
        build_config("demo", {"data.source": "lmdb", "data.epoch_size": "10", "data.num_frames": "4"})


def test_a_section_or_preset_taken_by_another_method_is_refused():
    class Spec:
        name, presets, renamed = "other", {}, {}
        sections = {"noise": type("NotNoise", (), {})}

    with pytest.raises(ValueError, match="config section 'noise' is taken"):
        config_registry.register_method(Spec)
    Spec.sections, Spec.presets = {}, {"demo": {}}
    with pytest.raises(ValueError, match="preset name 'demo' is taken"):
        config_registry.register_method(Spec)
    # A field taken over from another method's section must land in the taker's own section.
    Spec.presets, Spec.took_over = {}, {"noise.num_timesteps": "diffmae.num_timesteps"}
    with pytest.raises(ValueError, match="took over 'noise.num_timesteps' into 'diffmae.num_timesteps'"):
        config_registry.register_method(Spec)
    assert "other" not in config_registry.METHODS
    assert config_registry.TOOK_OVER["diffmae"] == {"noise.num_timesteps": "diffmae.num_timesteps"}


def test_replace_keeps_every_section_and_validates():
    cfg = build_config("demo", {"noise.schedule": "single_level"})
    new = cfg.replace(data=build_config("demo", {"data.img_size": "16"}).data)
    assert new.noise.schedule == "single_level" and new.data.img_size == 16 and new.preset == "demo"
    assert new != cfg and cfg.replace() == cfg
    with pytest.raises(ConfigError, match="unknown config section"):
        cfg.replace(nope=1)


def test_the_mechanism_reads_no_method_section():
    """config.py checks relations between the shared sections only: a method's section (noise,
    diffmae, ...) is read by its own MethodSpec.validate, so removing a method leaves config.py whole."""
    import ast

    from ldae_fast import config

    tree = ast.parse(Path(config.__file__).read_text())
    reads = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & set(config_registry.SECTIONS))
    assert config_registry.SECTIONS and not reads


def test_a_setting_of_a_method_that_does_not_run_is_refused_by_name():
    """`--diffmae.mask_ratio` on an l-DAE run would be stored and never read: one line, exit 2."""
    import ldae_fast.methods  # noqa: F401
    from ldae_fast.config import ConfigError, build_config, parse_cli

    with pytest.raises(ConfigError, match=r"--diffmae.mask_ratio: a setting of method 'diffmae'.*'ldae'"):
        build_config("demo", {"diffmae.mask_ratio": "0.5"})
    with pytest.raises(ConfigError, match=r"--ldae.class_cond: .*objective.method='mae'"):
        parse_cli(["--objective.method=mae", "--ldae.class_cond=true"])
    assert build_config("demo", {"objective.method": "diffmae", "diffmae.mask_ratio": "0.5"}).diffmae.mask_ratio == 0.5
    # An old spelling that moved to several methods' sections is judged by the method that reads it.
    assert build_config("demo", {"objective.method": "mae", "objective.mask_ratio": "0.6"}).mae.mask_ratio == 0.6


def test_a_setting_of_another_methods_section_is_refused_whatever_its_name():
    """Ownership, not the section's name: l-DAE's `noise` section is not DiffMAE's or MAE's, and an
    old spelling none of whose new places the running method reads is refused too."""
    from ldae_fast.config import parse_cli

    with pytest.raises(ConfigError, match=r"--noise.schedule: a setting of method 'ldae'.*'mae'"):
        parse_cli(["--preset", "mae-demo", "--noise.schedule=single_level"])
    with pytest.raises(ConfigError, match=r"--objective.mask_ratio: now diffmae.mask_ratio / mae.mask_ratio, "
                                          r"which objective.method='ldae' does not read"):
        build_config("demo", {"objective.mask_ratio": "0.5"})
    assert build_config("demo", {"noise.schedule": "single_level"}).noise.schedule == "single_level"


def _saved(tmp_path, preset, edit=None, **over):
    import json

    d = build_config(preset, over).to_dict()
    for key, value in (edit or {}).items():
        sec, _, name = key.partition(".")
        d[sec][name] = value
    path = tmp_path / f"{preset}.json"
    path.write_text(json.dumps(d))
    return path


def test_a_stored_value_of_another_methods_section_is_refused_naming_key_and_file(tmp_path):
    """A stored config holds every section, the other methods' at their defaults: one that differs
    was set for another method and would be stored here and never read."""
    from ldae_fast.config import parse_cli

    path = _saved(tmp_path, "diffmae-demo", {"noise.schedule": "single_level"})
    with pytest.raises(ConfigError) as e:
        parse_cli(["--config", str(path)])
    msg = str(e.value)
    assert msg.startswith(f"--config {path}: noise.schedule='single_level' is a setting of method 'ldae', "
                          "and objective.method='diffmae' does not read it; set it back to 'sigma_linear'")
    assert "drop section 'noise'" in msg and "\n" not in msg and e.value.exit_code == 2
    # Switching the method of a replay leaves the file's own method's settings unread: refused too.
    with pytest.raises(ConfigError, match=r"diffmae.sample_steps=50 is a setting of method 'diffmae'"):
        parse_cli(["--config", str(_saved(tmp_path, "diffmae-demo")), "--objective.method=ldae"])
    with pytest.raises(ConfigError, match=r"preset 'diffmae-demo': diffmae.sample_steps=50 .* pick a preset of "
                                          r"method 'ldae', or run --objective.method=diffmae"):
        build_config("diffmae-demo", {"objective.method": "ldae"})
    # A field DiffMAE took over, set in l-DAE's section beside DiffMAE's own: named with its new place.
    path = _saved(tmp_path, "diffmae-demo", {"noise.num_timesteps": 200})
    with pytest.raises(ConfigError, match=r"noise.num_timesteps=200 is a setting of method 'ldae'; objective.method="
                                          r"'diffmae' reads diffmae.num_timesteps instead"):
        parse_cli(["--config", str(path)])


def test_every_presets_saved_config_replays_to_the_same_run(tmp_path):
    from ldae_fast.config import parse_cli

    for preset in config_registry.PRESETS:
        cfg = build_config(preset)
        path = tmp_path / f"{preset}.json"
        cfg.save(path)
        assert parse_cli(["--config", str(path)])[0] == cfg, preset
    # A run given an old spelling saves it where its method reads it, and replays too.
    cfg = build_config("mae-demo", {"objective.mask_ratio": "0.6"})
    cfg.save(tmp_path / "old-spelling.json")
    back = parse_cli(["--config", str(tmp_path / "old-spelling.json")])[0]
    assert back == cfg and back.mae.mask_ratio == 0.6 and back.diffmae.mask_ratio == 0.75


def test_old_spellings_in_a_stored_config_are_not_judged(tmp_path):
    """A config saved before the method sections stores objective.mask_ratio and the like for every
    method: read where the running method reads them, dropped where it reads none of them."""
    from ldae_fast.config import parse_cli

    old = ROOT / "tests" / "assets" / "configs_before_method_sections"
    mae = parse_cli(["--config", str(old / "mae-demo.json")])[0]
    assert mae.mae.mask_ratio == 0.6 and mae.diffmae == type(mae.diffmae)()
    ld = parse_cli(["--config", str(old / "demo-dit.json")])[0]
    assert ld.diffmae == type(ld.diffmae)() and ld.mae == type(ld.mae)()


def test_a_value_an_old_shared_spelling_wrote_into_every_method_replays(tmp_path):
    """Before old spellings went to the running method alone, `--objective.mask_ratio=0.6` on a
    DiffMAE run stored 0.6 in mae.mask_ratio too: that run's config.json still replays. A value of
    the other method's section that the running method's own field does not share is refused."""
    from ldae_fast.config import parse_cli

    path = _saved(tmp_path, "diffmae-demo", {"diffmae.mask_ratio": 0.6, "mae.mask_ratio": 0.6})
    back = parse_cli(["--config", str(path)])[0]
    assert back.diffmae.mask_ratio == 0.6 and back.objective.method == "diffmae"
    path = _saved(tmp_path, "diffmae-demo", {"diffmae.mask_ratio": 0.6, "mae.mask_ratio": 0.5})
    with pytest.raises(ConfigError, match=r"mae.mask_ratio=0.5 is a setting of method 'mae'"):
        parse_cli(["--config", str(path)])
