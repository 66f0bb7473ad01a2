"""bench/results_io.py: importing runs written on another machine (a lent GPU's $OUT)."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture()
def rio(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import results_io

    return results_io


def test_import_copies_json_and_rebuilds_markdown(rio, tmp_path, monkeypatch):
    monkeypatch.setenv("LDAE_GIT_COMMIT", "abc1234")
    away, home = tmp_path / "away", tmp_path / "home"
    jp, mp = rio.write_result("train_step", [{"model": "ViT-B", "images_per_s": 1.5}], {"peak_tflops": 989.0},
                              out_dir=away)
    assert json.loads(jp.read_text())["meta"]["git_commit"] == "abc1234"
    # Home already holds an older run of the same benchmark: the import appends after it.
    rio.write_result("train_step", [{"model": "ViT-L", "images_per_s": 0.5}], out_dir=home)
    before = (home / "train_step.md").read_text()

    assert rio.main(["import", str(away), "--out-dir", str(home)]) == 0
    # Both runs kept, even when they were written in the same second (same file name).
    homes = sorted(home.glob("train_step-*.json"))
    assert len(homes) == 2 and jp.read_text() in [p.read_text() for p in homes]
    md = (home / "train_step.md").read_text()
    section = mp.read_text().split("\n\n", 2)[2]  # the away file's only section, past its title
    assert md == before + section
    # Twice is once.
    assert rio.import_results(away, home) == []
    assert (home / "train_step.md").read_text() == md


def test_import_rejects_foreign_json(rio, tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a results file"):
        rio.import_results(tmp_path, tmp_path / "out")


def test_gpu_session_script_stages_match_its_header(tmp_path):
    """bench/gpu_session.sh: every stage its header documents is implemented and vice versa, and
    an unknown stage fails the command (a lent GPU's minutes must not go to a typo)."""
    import re
    import subprocess

    script = BENCH / "gpu_session.sh"
    text = script.read_text()
    header = text.split("set -uo pipefail")[0]
    documented = set(re.findall(r"^#   (\w+)\s{2,}", header.split("# Stages:")[1], re.M))
    implemented = set(re.findall(r"^    (\w+)\)", text, re.M))
    assert documented == implemented and {"tests", "kernels", "halfL", "deepspeed"} <= implemented
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), "nope"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert r.returncode == 1 and "unknown stage 'nope'" in r.stdout


def test_results_file_keeps_rows_of_a_run_cut_short(rio, tmp_path):
    """Rows written before a crash stay on disk (complete: false, no markdown yet); importing
    such a file marks its section incomplete."""
    with pytest.raises(KeyboardInterrupt):
        with rio.ResultsFile("kernels", {"command": "x"}, out_dir=tmp_path / "away") as f:
            f.add([{"op": "noise", "ms": 1.0}])
            f.add([{"op": "loss_fwd", "ms": 2.0}])
            raise KeyboardInterrupt
    data = json.loads(f.json_path.read_text())
    assert [r["op"] for r in data["rows"]] == ["noise", "loss_fwd"] and data["meta"]["complete"] is False
    assert not (tmp_path / "away" / "kernels.md").exists()
    rio.import_results(tmp_path / "away", tmp_path / "home")
    assert "(incomplete: the run stopped early)" in (tmp_path / "home" / "kernels.md").read_text()
    # A completed run says so.
    jp, _ = rio.write_result("kernels", [{"op": "noise"}], out_dir=tmp_path / "done")
    assert json.loads(jp.read_text())["meta"]["complete"] is True


def _session_commands() -> list[list[str]]:
    """The python command lines bench/gpu_session.sh runs, as argv lists (continuations joined,
    shell variables replaced by placeholders)."""
    import shlex

    text = (BENCH / "gpu_session.sh").read_text().replace("\\\n", " ")
    cmds = []
    for line in text.splitlines():
        words = shlex.split(line.replace('"$OUT_DIR', '"/tmp/out').replace("$PY", "python"), comments=True)
        if "$@" in words:  # the step() helper's own body, not a stage
            continue
        words = [w for w in words if w != ";;"]
        if words and words[0].endswith(")"):  # a case label: `kernels) run kernels ...`
            words = words[1:]
        if words[:1] == ["step"]:
            cmds.append(["bench/train_step.py", *words[2:]])
        elif words[:1] == ["run"]:
            progs = [i for i, w in enumerate(words) if w.startswith("bench/") or w == "train.py"]
            if progs:
                cmds.append(words[progs[0]:])
            elif "pytest" in words:
                cmds.append(["pytest", *(w for w in words if w.startswith("tests/"))])
    return cmds


def test_gpu_session_commands_parse():
    """Every command the GPU session script runs parses with today's flags and config fields, so a
    lent GPU's minutes are not lost to a renamed option."""
    import importlib.util

    from ldae_fast.config import parse_cli

    def load(name):
        spec = importlib.util.spec_from_file_location(f"_gs_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod

    cmds = _session_commands()
    scripts = {c[0] for c in cmds}
    assert scripts == {"bench/train_step.py", "bench/kernels.py", "train.py", "pytest"}, scripts
    root = BENCH.parent
    ts, kb = load("train_step"), load("kernels")
    for argv in cmds:
        if argv[0] == "bench/train_step.py":
            a = ts.parse_args(argv[1:])
            assert set(a.sizes.split(",")) <= set(ts.SIZE_LABELS), argv
            for v in a.variants.split(","):
                assert v in ts.VARIANTS or v == "ablations", argv
        elif argv[0] == "bench/kernels.py":
            kb.parse_args(argv[1:])
        elif argv[0] == "pytest":
            for t in argv[1:]:  # the GPU test files and test names it names exist
                path, _, name = t.partition("::")
                assert (root / path).exists(), t
                assert not name or f"def {name}(" in (root / path).read_text(), t
        else:
            cfg, rest = parse_cli(argv[1:])
            assert rest == [] and cfg.engine.backend == "deepspeed", rest


def _gpu_check_folder(rio, path, monkeypatch):
    """A folder shaped like what bench/gpu_check.sh returns from an H200: env.json with its stage
    rows, kernels.json and train_step.json in results_io's shape, learn.json in learn_check's
    own shape (rows and a little meta, no environment), and the logs."""
    monkeypatch.setenv("LDAE_GIT_COMMIT", "abc1234")
    gpu = {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "torch": "2.11.0+cu130", "triton": "3.6.0",
           "cuda": "13.0"}
    env = rio.ResultsFile("gpu_check", {"command": "LDAE_GIT_COMMIT=abc1234 bash bench/gpu_check.sh",
                                        "mode": "gpu", "files": rio.GPU_CHECK_FILES, "driver": "580.159.04"},
                          json_path=path / "env.json")
    env.meta.update(gpu, date="2026-12-01T09:00:00+00:00")
    env.close()
    assert env.md_path is None and sorted(p.name for p in path.iterdir()) == ["env.json"]
    for name, rows in (("kernels", [{"op": "noise", "variant": "triton", "dtype": "bf16", "B": 256, "d": 128,
                                     "GBps": 3900.0, "frac_copy": 0.9, "status": "ok"}]),
                       ("train_step", [{"model": "ViT-1/2L", "batch": 128, "variant": "d", "variant_name": "ldae-fast",
                                        "images_per_s": 1150.0, "mfu": 0.57, "status": "ok"}])):
        f = rio.ResultsFile(name, {"command": f"python3 bench/{name}.py"}, json_path=path / f"{name}.json")
        f.meta.update(gpu, date="2026-12-01T09:01:00+00:00")
        f.add(rows)  # complete stays false: as if the stage had been killed at its limit
    (path / "learn.json").write_text(json.dumps({
        "meta": {"budget_s": 150, "command": "python3 bench/learn_check.py --data-dir gpu-data",
                 "train_shards": ["train-000000.tar.gz"], "val_shards": ["val-000000.tar.gz"]},
        "stages": {"pretrain": {"steps": 3000}},
        "rows": [{"encoder": "pretrained", "knn_top1": 0.21, "probe_top1": 0.18, "steps": 3000},
                 {"encoder": "random-init", "knn_top1": 0.05, "probe_top1": 0.04, "steps": 0}],
        "summary": {"floor_seeds": 1, "floor_knn_mean": 0.05, "floor_knn_std": float("nan"),
                    "floor_probe_mean": 0.04, "floor_probe_std": float("nan"), "knn_margin": 0.16,
                    "probe_margin": 0.14, "chance": 0.5},
        "markdown": "| encoder | knn_top1 |\n|---|---|"}))
    for name, text in (("tests.log", "6 passed in 3.1s\n"), ("profile.md", "| # | kernel |\n"),
                       ("gpu_check.log", "=== done\n"), ("summary.md", "## Performance\n")):
        (path / name).write_text(text)
    for stage, rc, extra in (("env", 0, {}), ("tests", 0, {"log": "tests.log"}), ("kernels", 124, {"file": "kernels.json"}),
                             ("learn", 0, {"file": "learn.json"})):
        rio.gpu_check_stage(path / "env.json", stage, rc, 12.0, 75.0, **extra)
    return path


def test_import_takes_a_gpu_check_folder(rio, tmp_path, monkeypatch):
    """What gpu_check.sh returns: every JSON lands under its benchmark's name with its device and
    date, learn_check's rows get the environment from env.json (and say so), the logs are kept
    beside them, the stage rows count tests and rows, and the perf section shows it all."""
    away = _gpu_check_folder(rio, tmp_path / "away", monkeypatch)
    stages = {r["stage"]: r for r in json.loads((away / "env.json").read_text())["rows"]}
    assert stages["tests"]["passed"] == 6 and stages["tests"]["status"] == "ok"
    assert stages["kernels"]["status"] == "timed out at its 75 s limit" and stages["kernels"]["rows"] == 1
    assert stages["learn"]["rows"] == 2 and stages["learn"]["rows_ok"] == 2

    home = tmp_path / "home"
    assert rio.main(["import", str(away), "--out-dir", str(home)]) == 0
    stored = sorted(p.name for p in home.glob("*.json"))
    assert stored == ["gpu_check-20261201T090000Z-nvidia-h200.json", "kernels-20261201T090100Z-nvidia-h200.json",
                      "learn_check-20261201T090000Z-nvidia-h200.json", "train_step-20261201T090100Z-nvidia-h200.json"]
    learn = json.loads((home / stored[2]).read_text())
    assert learn["name"] == "learn_check" and learn["rows"][0]["encoder"] == "pretrained"
    assert learn["meta"]["gpu"] == "NVIDIA H200" and learn["meta"]["git_commit"] == "abc1234"
    assert learn["meta"]["budget_s"] == 150 and learn["meta"]["command"].startswith("python3 bench/learn_check.py")
    assert "gpu" in learn["meta"]["environment_from_env_json"]
    raw = home / "gpu_check-20261201T090000Z-nvidia-h200"
    assert sorted(p.name for p in raw.iterdir()) == ["gpu_check.log", "profile.md", "summary.md", "tests.log"]
    assert "(incomplete: the run stopped early)" in (home / "kernels.md").read_text()
    assert "| pretrained | 0.21 | 0.18 | 3000 |" in (home / "learn_check.md").read_text()
    assert rio.import_results(away, home) == []  # twice is once

    perf = _perf()
    text = perf.render(home)
    assert "### gpu_check — NVIDIA H200" in text and "| kernels | timed out at its 75 s limit |" in text
    assert "### learn_check — NVIDIA H200" in text and "| pretrained | 0.21 | 0.18 | 3000 |" in text
    assert ("random-init floor (mean ± std over 1 seeds: kNN 0.05, probe 0.04): kNN +0.16, probe +0.14 points; "
            "chance 0.5%; pretraining budget 150 s; shards train-000000.tar.gz, val-000000.tar.gz.") in text
    assert "- markdown:" not in (home / "learn_check.md").read_text()
    assert "**ViT-1/2L**: 1,150 images/s at micro-batch 128, MFU 57.0%" in text
    # The summary gpu_check.sh writes into $OUT reads the same folder directly.
    assert perf.render(away, include_cpu=True, all_runs=True).count("### ") == 4


def test_a_foreign_json_in_a_gpu_check_folder_is_refused_by_name(rio, tmp_path, monkeypatch):
    away = _gpu_check_folder(rio, tmp_path / "away", monkeypatch)
    (away / "stray.json").write_text(json.dumps({"rows": [{"a": 1}]}))
    assert rio.main(["import", str(away), "--out-dir", str(tmp_path / "home")]) == 1
    with pytest.raises(ValueError, match="stray.json: not a results file"):
        rio.import_results(away, tmp_path / "home")


def _perf():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_rio_perf", BENCH / "make_perf_section.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
