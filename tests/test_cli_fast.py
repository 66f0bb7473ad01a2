"""`--help`, `--version` and usage errors answer before torch is imported (issue 21 item 15).

Checked by what the process imported (`sys.modules` at exit), not by a wall-clock limit: a
command that imports torch before parsing its arguments fails here on any machine, however fast.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from ldae_fast import __version__
from ldae_fast.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent

# Runs an entry point as `python train.py ...` or `python -m ldae_fast ...` would, then reports on
# stderr whether torch was imported.
_WRAP = """
import atexit, runpy, sys
atexit.register(lambda: print("TORCH:" + str("torch" in sys.modules), file=sys.stderr))
entry, sys.argv = sys.argv[1], sys.argv[1:]
if entry == "train.py":
    runpy.run_path(entry, run_name="__main__")
else:
    sys.argv[0] = entry
    runpy.run_module(entry, run_name="__main__", alter_sys=True)
"""

CASES = [
    ("train.py", ["--help"], 0),
    ("train.py", ["--preset", "tiny-imagenet", "--help"], 0),
    ("train.py", ["--version"], 0),
    ("train.py", ["--bogus"], 2),
    ("train.py", ["--model.width=abc"], 2),
    ("train.py", ["--preset", "nope"], 2),
    ("ldae_fast", ["--help"], 0),
    ("ldae_fast", ["--version"], 0),
    ("ldae_fast", [], 2),
    ("ldae_fast", ["frobnicate"], 2),
    *[("ldae_fast", [cmd, "--help"], 0) for cmd in COMMANDS],
    ("ldae_fast", ["eval"], 2),
    ("ldae_fast", ["export"], 2),
    ("ldae_fast", ["make-shards"], 2),
    ("ldae_fast", ["write-video-shards"], 2),
    ("ldae_fast", ["fit-pca", "--out"], 2),
    ("ldae_fast", ["fit-tokenizer", "--kind", "nope"], 2),
    ("ldae_fast", ["ablate", "--bogus"], 2),
    ("ldae_fast", ["featlearn", "no-such-experiment"], 2),
    ("ldae_fast.featlearn", ["--help"], 0),
]


@pytest.mark.parametrize("entry, argv, code", CASES, ids=[" ".join([e, *a]) or e for e, a, _ in CASES])
def test_answers_without_importing_torch(entry, argv, code):
    p = subprocess.run([sys.executable, "-c", _WRAP, entry, *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == code, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1] == "TORCH:False", p.stderr[-2000:]
    if "--version" in argv:
        assert p.stdout.startswith(f"ldae-fast {__version__}")


def test_python_dash_m_ldae_fast():
    p = subprocess.run([sys.executable, "-m", "ldae_fast", "--version"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == f"ldae-fast {__version__}", p.stderr


def test_version_matches_the_package_metadata():
    import re

    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared and declared.group(1) == __version__


def test_make_install_hides_the_known_pip_noise_only(tmp_path):
    """The Makefile's quiet pip: the per-package file:// index warning is dropped, every other line
    (errors included) passes, and pip's exit status is kept."""
    import shutil

    if shutil.which("make") is None or shutil.which("bash") is None:
        pytest.fail("make and bash are needed to install (README, Install)")
    fake = tmp_path / "python"  # stands for the venv's python: `$(PY) -m pip ...`
    fake.write_text("#!/bin/sh\n"
                    "echo \"WARNING: Location 'file:///opt/pypi-more/simple/numpy/' is ignored: it is "
                    "neither a file nor a directory.\" >&2\n"
                    "echo 'Collecting numpy'\n"
                    "echo 'ERROR: No matching distribution found for numpy' >&2\n"
                    "exit 3\n")
    fake.chmod(0o755)
    (tmp_path / "probe.mk").write_text(f"include {ROOT / 'Makefile'}\n"
                                       "probe:\n\t@$(PIP) install numpy; echo \"rc=$$?\"\n")
    p = subprocess.run(["make", "-s", "-f", str(tmp_path / "probe.mk"), f"PY={fake}", "probe"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.stdout.splitlines() == ["Collecting numpy", "ERROR: No matching distribution found for numpy",
                                     "rc=3"], p.stdout + p.stderr
