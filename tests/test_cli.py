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
