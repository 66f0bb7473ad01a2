"""Import a script of bench/ (not a package) as a module of its own, for the tests that drive it."""

import importlib.util
import itertools
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
_count = itertools.count()


def load_bench(name: str):
    """bench/NAME.py as a fresh module (its sibling scripts importable): each call its own copy,
    so one test file's patches never reach another's."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}_{next(_count)}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
