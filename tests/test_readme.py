"""The README's performance section is generated from bench/results and must not drift from it."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _perf_module():
    spec = importlib.util.spec_from_file_location("make_perf_section", ROOT / "bench" / "make_perf_section.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_perf_section_matches_results():
    mod = _perf_module()
    readme = (ROOT / "README.md").read_text()
    expected = mod.render(mod.RESULTS_DIR, False, False).strip()
    assert mod.readme_section(readme) == expected, "run: python bench/make_perf_section.py --update-readme"


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()
