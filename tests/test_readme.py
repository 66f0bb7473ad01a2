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


def test_bench_readme_flop_figures_are_the_codes():
    """bench/README quotes our training FLOPs per image beside the issue's round formula
    3 x blocks x N x (24 w^2 + 4 N w) + patch embedding + head; both come from here."""
    import re

    from ldae_fast.config import ModelConfig
    from ldae_fast.methods.ldae.config import LDAEConfig
    from ldae_fast.methods.ldae.flops import train_flops_per_image

    text = " ".join((ROOT / "bench" / "README.md").read_text().split())
    for size in ("halfL", "B"):
        # The bench's layout, the paper's 'dit' (N tokens); 'mae' (N + 1) is quoted in brackets.
        m = ModelConfig(size=size, patch_size=16)
        N, w, p = (256 // 16) ** 2, m.width, 16
        blocks = m.encoder_depth + m.decoder_depth
        round_fwd = blocks * N * (24 * w * w + 4 * N * w) + 2 * N * (3 * p * p) * w + 2 * N * w * (3 * p * p)
        ours = train_flops_per_image(m, LDAEConfig(layout="dit"), 256)[1] / 1e9
        quoted = f"{ours:.1f} against {3 * round_fwd / 1e9:.1f}"
        assert re.search(re.escape(quoted), text), (size, quoted)
        mae = train_flops_per_image(m, LDAEConfig(layout="mae"), 256)[1] / 1e9
        assert f"{mae:.1f}" in text, (size, mae)
