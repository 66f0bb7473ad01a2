"""The method seam as a place: one registry, and no module outside methods/ naming a method."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from ldae_fast.config import PRESETS, build_config
from ldae_fast.methods import METHODS, MethodSpec, all_presets, spec_for

ROOT = Path(__file__).resolve().parents[1]
# Folders that may name a concrete method: the methods themselves and the tokenizers they own.
OWNERS = ("ldae_fast/methods", "ldae_fast/tokenizers")
# The few places outside them that must, each with its reason: (file, a text on the line; None:
# the whole file).
ALLOWED = {
    # The default of objective.method: a run with no preset trains l-DAE.
    ("ldae_fast/config.py", 'method: str = "ldae"'),
    # The project's own tag in an exported encoder's timm config.
    ("ldae_fast/models/timm_export.py", '"tag": "ldae"'),
    # 'mae' here is MAE's fine-tuning head init (2e-5), a recipe choice, not the method.
    ("ldae_fast/eval/driver.py", "--finetune-head-init"),
}
# l-DAE's model.layout values include 'mae' (the MAE-shaped halves), older than the MAE method:
# on a line about the layout the word is that value, not the method.
LAYOUT_LINE = re.compile(r"\blayout\b|LAYOUTS")


def _sources():
    for f in sorted([*ROOT.joinpath("ldae_fast").rglob("*.py"), *ROOT.joinpath("bench").rglob("*.py"),
                     ROOT / "train.py"]):
        rel = f.relative_to(ROOT).as_posix()
        if not rel.startswith(OWNERS):
            yield rel, f.read_text()


def _names_a_method(tree: ast.AST, names: set[str]):
    """(line, what) for every string constant equal to a method name and every import of a
    method's module or of a name a method exports."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in names:
            yield node.lineno, repr(node.value)
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if "methods" in parts and set(parts[parts.index("methods") + 1:]) & names:
                yield node.lineno, f"from {node.module}"
            elif parts[-1:] == ["methods"] and {a.name for a in node.names} & names:
                yield node.lineno, f"from {node.module} import a method"
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if "methods" in parts and set(parts[parts.index("methods") + 1:]) & names:
                    yield node.lineno, f"import {a.name}"


def _violations(rel: str, text: str, names: set[str]) -> list[str]:
    if (rel, None) in ALLOWED:
        return []
    lines, bad = text.splitlines(), []
    for lineno, what in _names_a_method(ast.parse(text), names):
        line = lines[lineno - 1]
        if what == "'mae'" and LAYOUT_LINE.search(line):
            continue
        if any(rel == f and snippet in line for f, snippet in ALLOWED if snippet):
            continue
        bad.append(f"{rel}:{lineno}: {what}: {line.strip()}")
    return bad


def test_no_module_outside_methods_names_a_method():
    names = set(METHODS)
    bad = [v for rel, text in _sources() for v in _violations(rel, text, names)]
    assert not bad, "reach a method through the registry (ldae_fast.methods):\n" + "\n".join(bad)


def test_the_scan_sees_a_method_name():
    # The scan above would pass on a pattern that matches nothing: it must flag what it is for.
    names = set(METHODS)
    code = ("from ldae_fast.methods.ldae import method\nfrom ldae_fast.methods import diffmae\n"
            "if cfg.objective.method == 'mae':\n    pass\nx = 'ldae_fast'\n")
    assert [ln for ln, _ in _names_a_method(ast.parse(code), names)] == [1, 2, 3]
    assert _violations("ldae_fast/eval/x.py", "layout = 'mae'\n", names) == []


def test_every_method_is_one_spec_with_every_entry():
    assert len(METHODS) >= 3
    for name, spec in METHODS.items():
        assert isinstance(spec, MethodSpec) and spec.name == name and spec_for(name) is spec
        for preset, over in spec.presets.items():
            assert PRESETS[preset] is over
            assert build_config(preset).objective.method == name, preset
    assert PRESETS == all_presets()


def test_objective_method_is_checked_against_the_registry():
    from ldae_fast.config import ConfigError

    with pytest.raises(ConfigError, match=r"objective.method='nope' is not allowed; choose one of " +
                       ", ".join(METHODS)):
        build_config("demo", {"objective.method": "nope"})


def test_eval_figure_on_a_diffmae_checkpoint_draws_its_inpainting(tmp_path, capsys):
    """`ldae-fast eval --protocols figure` draws the checkpoint's method's own figure, labelled in
    its own terms, and logs no l-DAE probe sigma for a method that has none."""
    from PIL import Image

    from ldae_fast.engine.loop import train
    from ldae_fast.eval import driver

    over = {"model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
            "model.decoder_heads": "2", "data.img_size": "16", "data.batch_size": "4",
            "data.synthetic_images": "32", "engine.kernels": "reference", "engine.steps": "1",
            "engine.progress": "false", "eval.probe": "false", "eval.figure": "false",
            "diffmae.sample_steps": "4", "engine.out_dir": str(tmp_path / "run")}
    res = train(build_config("diffmae-demo", over))
    capsys.readouterr()
    out = tmp_path / "eval"
    rc = driver.main(["--checkpoint", str(res.checkpoint), "--data", "synthetic", "--max-train-images", "8",
                      "--max-val-images", "8", "--figure-images", "2", "--protocols", "figure", "--out", str(out)])
    assert rc == 0
    log = capsys.readouterr().out
    assert not (out / "denoising.png").exists()
    png = out / "inpainting.png"
    assert f"figure (original / masked / inpainted at t 1000, 500, 0; random and center masks, 4 reverse " \
           f"steps): {png}" in log
    assert "sigma" not in log
    # 2 images x 2 masks rows; original, masked, t = 1000, 500, 0 columns of 64 px cells.
    assert Image.open(png).size == (5 * 64 + 6 * 2, 12 + 2 + 4 * 64 + 5 * 2)
    rec = json.loads((out / "eval.json").read_text())
    assert rec["figure"] == str(png)


def test_eval_probe_log_names_each_methods_own_conditioning():
    from ldae_fast.eval.features import probe_note

    assert probe_note(build_config("demo")).startswith("sigma ")
    for preset in ("diffmae-demo", "mae-demo"):
        note = probe_note(build_config(preset))
        assert "sigma" not in note and note.startswith("clean unmasked input")


def test_eval_reaches_a_networks_layout_only_through_the_spec():
    """What a probe reads past the encoder (l-DAE's 'dit' layout) is the method's answer
    (MethodSpec.probe_encoder): eval, the engine, the CLIs and bench compare with no layout value."""
    from ldae_fast.methods.ldae.config import LAYOUTS

    values = set(LAYOUTS) - set(METHODS)
    assert values == {"dit"}  # the scan looks for something
    hits = [f"{rel}:{node.lineno}" for rel, text in _sources()
            if rel.startswith(("ldae_fast/eval", "ldae_fast/engine", "ldae_fast/train", "ldae_fast/cli", "bench"))
            for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Constant) and node.value in values]
    assert not hits, hits
    from ldae_fast.eval.features import probe_encoder

    cfg = build_config("diffmae-demo")
    model = spec_for(cfg).build_model(cfg, "reference")
    cfg.eval.probe_depth = len(model.encoder.blocks) + 1  # past validation, as a flag could set it
    with pytest.raises(ValueError, match="encoder blocks to probe"):
        probe_encoder(model, cfg)


def test_mae_checkpoints_fine_tune_with_maes_recipe_and_say_so():
    from ldae_fast.eval.finetune import DEFAULT_SOURCE, recipe_for_method

    r, note = recipe_for_method("mae", "B", 12, None)
    assert (r.blr, r.layer_decay, r.epochs, r.drop_path, r.ema_decay) == (5e-4, 0.65, 100, 0.1, 0.0)
    assert "MAE" in note and "l-DAE" not in note
    r, note = recipe_for_method("mae", "L", 24, None)
    assert (r.blr, r.layer_decay, r.epochs, r.drop_path) == (1e-3, 0.75, 50, 0.2)
    # Every method names where its recipe comes from; an encoder without one is labelled the default.
    assert all(s.finetune_source for s in METHODS.values() if s.finetune_recipes())
    _, note = recipe_for_method("(exported encoder)", "B", 12, torch.nn.Module())
    assert note == DEFAULT_SOURCE and note.startswith("default recipe")
