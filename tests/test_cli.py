"""Command-line behaviour a user meets first: help, flags, missing optional dependencies."""

import importlib.util

from ldae_fast import train as train_cli


def test_deepspeed_backend_without_deepspeed_is_one_line(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    rc = train_cli.main(["--engine.backend=deepspeed", f"--engine.out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "ldae-fast[scale]" in err and "engine.backend" in err
    assert not any(tmp_path.iterdir()), "refused before any work"


def test_help_lists_every_field_with_type_default_and_docstring(capsys):
    import dataclasses
    import re

    from ldae_fast.config import Config, _field_docs

    assert train_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    sections = Config.sections()
    assert {"profile", "noise"} <= set(sections), "shared and registered method sections"
    flat = " ".join(out.split())
    for name, cls in sections.items():
        docs = _field_docs(cls)
        assert f"\n{name}:\n" in out
        for f in dataclasses.fields(cls):
            assert re.search(rf"^  --(\[no-\])?{name}\.{f.name}[ ,]", out, re.M), f.name
            assert docs.get(f.name), f"{name}.{f.name} has no docstring"
            assert " ".join(docs[f.name].split()) in flat, f.name
    assert "--[no-]engine.compile BOOL (default false)" in out
    assert "--data.batch_size INT (default 64) [demo: 64]" in out
    assert "--engine.out_dir, --out STR (default 'runs/demo') [demo: runs/demo]" in out
    assert train_cli.main(["--preset", "tiny-imagenet", "--help"]) == 0
    assert "--data.img_size INT (default 32) [tiny-imagenet: 64]" in capsys.readouterr().out


def test_boolean_flags_and_value_forms():
    from ldae_fast.config import parse_cli

    cfg, rest = parse_cli(["--engine.compile", "--extra", "x"])
    assert cfg.engine.compile is True and rest == ["--extra", "x"]
    cfg, rest = parse_cli(["--engine.deterministic", "positional"])
    assert cfg.engine.deterministic is True and rest == ["positional"], "a bare flag swallows nothing"
    cfg, rest = parse_cli(["--no-eval.probe", "--eval.figure", "false", "--data.hflip=no"])
    assert (cfg.eval.probe, cfg.eval.figure, cfg.data.hflip, rest) == (False, False, False, [])
    a, _ = parse_cli(["--out=runs/x", "--engine.seed=3"])
    b, _ = parse_cli(["--out", "runs/x", "--engine.seed", "3"])
    assert a.engine.out_dir == b.engine.out_dir == "runs/x" and a.engine.seed == b.engine.seed == 3


def test_cli_value_errors_name_the_flag():
    import pytest

    from ldae_fast.config import ConfigError, parse_cli

    with pytest.raises(ConfigError, match="--no-eval.probe takes no value"):
        parse_cli(["--no-eval.probe=true"])
    with pytest.raises(ConfigError, match="--engine.seed needs a value"):
        parse_cli(["--engine.seed"])
    with pytest.raises(ConfigError, match="unknown field 'nope' in section 'engine'"):
        parse_cli(["--engine.nope=1"])


FIT = ["--tokenizer.fit_images=16", "--data.synthetic_images=32", "--data.batch_size=8"]


def test_fit_pca_out_forms_write_the_file(tmp_path, monkeypatch, capsys):
    from ldae_fast import tokenizer_cli
    from ldae_fast.tokenizers.pca import PCATokenizer

    monkeypatch.chdir(tmp_path)
    demo_tok = tmp_path / "runs" / "demo" / "tokenizer.safetensors"
    demo_tok.parent.mkdir(parents=True)
    demo_tok.write_bytes(b"the demo's")
    for argv in (["--out=a.safetensors"], ["--out", "b.safetensors"], []):
        assert tokenizer_cli.main(FIT + argv) == 0
    for name in ("a.safetensors", "b.safetensors"):
        assert (tmp_path / name).is_file()
        assert PCATokenizer.load(tmp_path / name).d == 16
    default = tmp_path / "runs" / "fit-pca" / "demo-p4-d16-n16.safetensors"
    assert default.is_file() and default.with_suffix(".json").is_file()
    assert demo_tok.read_bytes() == b"the demo's", "without --out the demo's tokenizer is untouched"
    out = capsys.readouterr()
    assert "\r" not in out.err, "not a terminal: plain lines"
    assert tokenizer_cli.main(FIT + ["--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
