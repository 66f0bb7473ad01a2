"""`ldae-fast ablate` on a toy: two trajectory rows, a tiny model, the built-in synthetic data."""

import json

import pytest

from ldae_fast.cli import main as cli_main
from ldae_fast.eval import ablate
from ldae_fast.methods.ldae.trajectory import ROWS

TOY = ["--set", "model.size=tiny", "--set", "model.patch_size=4", "--set", "data.img_size=32",
       "--set", "data.batch_size=32", "--set", "data.synthetic_images=256",
       "--set", "tokenizer.fit_images=64", "--set", "eval.probe_epochs=3", "--set", "engine.log_every=2",
       "--set", "eval.probe_batch_size=128"]
ROWS_UNDER_TEST = ["pca-d8", "lambda-gamma2"]


def _run(out, rows=ROWS_UNDER_TEST, budget=64):
    return cli_main(["ablate", "--rows", ",".join(rows), "--data", "synthetic", "--budget", str(budget),
                     "--out", str(out), *TOY])


def test_ablate_table_and_resume(tmp_path, capsys):
    assert _run(tmp_path) == 0
    md = (tmp_path / "ablation.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| row | change | paper | ours probe | ours kNN | floor")
    body = lines[2:]
    assert [ln.split(" | ")[0].strip("| ") for ln in body] == ROWS_UNDER_TEST
    for ln, name in zip(body, ROWS_UNDER_TEST):
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert cells[1] == ROWS[name].change and cells[2] == f"{ROWS[name].paper_acc:.1f}"
        assert 0 <= float(cells[3]) <= 100 and 0 <= float(cells[4]) <= 100
        assert cells[6] == "64"  # 2 steps x 32 images
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["row"] for r in data["records"]] == ROWS_UNDER_TEST
    first = data["records"][0]
    # The row's own settings survive the toy overrides: d = 8, center crops.
    cfg = json.loads((tmp_path / "rows" / "pca-d8" / "config.json").read_text())
    assert cfg["tokenizer"]["latent_dim"] == 8 and cfg["data"]["crop"] == "center"
    assert cfg["engine"]["steps"] == 2 and cfg["model"]["size"] == "tiny"
    assert (tmp_path / "ablation.png").stat().st_size > 0
    from PIL import Image
    assert Image.open(tmp_path / "ablation.png").size[1] > 60

    # Resume: a finished row is skipped (its result kept), a missing result reruns that row only.
    (tmp_path / "rows" / "lambda-gamma2" / ablate.RESULT_FILE).unlink()
    capsys.readouterr()
    assert _run(tmp_path) == 0
    log = capsys.readouterr().out
    assert "pca-d8: " in log and "exists, skipped" in log
    assert "lambda-gamma2: predict clean latent" in log
    again = json.loads((tmp_path / "ablation.json").read_text())["records"]
    assert again[0] == first and len(again) == 2


def test_ablate_refuses_unknown_rows_and_bad_sets(tmp_path, capsys):
    assert cli_main(["ablate", "--rows", "nope", "--budget", "10", "--out", str(tmp_path)]) == 2
    assert "unknown row(s) nope" in capsys.readouterr().err
    assert cli_main(["ablate", "--rows", "pca-d8", "--budget", "10", "--out", str(tmp_path),
                     "--set", "model.size"]) == 2
    assert "section.field=value" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["pca-d8", "random-crop"])
def test_row_config_budget_and_run_dir(tmp_path, name):
    cfg, desc = ablate.row_config(name, "synthetic", 1000, {"model.size": "tiny", "data.img_size": "32",
                                                              "model.patch_size": "4"}, tmp_path, 0.1)
    assert desc == "synthetic" and cfg.engine.backend == "single" and cfg.engine.resume == "auto"
    assert cfg.engine.steps * cfg.global_batch() >= 1000 > (cfg.engine.steps - 1) * cfg.global_batch()
    assert cfg.engine.out_dir == str(tmp_path / "rows" / name)
    assert cfg.data.crop == ("random_resized" if name == "random-crop" else "center")
