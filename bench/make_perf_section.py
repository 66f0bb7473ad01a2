#!/usr/bin/env python
"""Print the README's performance section, generated from bench/results/*.json.

Every number in the section comes from a results file written by a benchmark through
bench/results_io.py: one table per results file, each with its GPU, date, versions and the command
that reproduces it. A row measured again by a newer run on the same GPU is shown from the newer
run only (every run with --all). CPU smoke runs are left
out unless --include-cpu. With no GPU results it prints how to produce them.

    python bench/make_perf_section.py                 # markdown on stdout
    python bench/make_perf_section.py > /tmp/perf.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_io  # noqa: E402

# Columns worth a README table, per benchmark, with their headers; other benchmarks show every
# column their rows have.
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "train_step": [
        ("model", "model"), ("layout", "layout"), ("tokens", "tokens"), ("d", "d"), ("batch", "batch"),
        ("mask_ratio", "mask"), ("decoder_kind", "decoder"), ("variant", "variant"), ("variant_name", "name"),
        ("train_gflop", "GFLOP/img"), ("images_per_s", "images/s"), ("tflops", "TFLOP/s"),
        ("mfu", "MFU"), ("peak_mem_gib", "peak mem (GiB)"), ("peak_reserved_gib", "reserved (GiB)"), ("vs_a", "x (a)"), ("vs_b", "x (b)"), ("vs_c", "x (c)"),
        ("vs_d", "x (d)"), ("cudagraph_skips", "graphs skipped"), ("status", "status"),
    ],
    # bench/gpu_check.sh's env.json: one row per stage of the one-command GPU run.
    "gpu_check": [
        ("stage", "stage"), ("status", "status"), ("seconds", "s"), ("limit_s", "limit (s)"),
        ("passed", "passed"), ("failed", "failed"), ("errors", "errors"), ("rows", "rows"),
        ("rows_ok", "rows ok"), ("failed_tests", "failed tests"), ("note", "note"),
    ],
    # bench/learn_check.py: pretrained vs random-init encoders on real data (top-1 in %).
    "learn_check": [
        ("encoder", "encoder"), ("seed", "seed"), ("knn_top1", "kNN top-1 (%)"), ("knn_k", "k"),
        ("knn_whitened_top1", "kNN whitened top-1 (%)"),
        ("probe_top1", "probe top-1 (%)"), ("images_seen", "images seen"), ("steps", "steps"),
        ("train_s", "pretrain (s)"), ("model", "model"), ("img_size", "px"), ("classes", "classes"),
        ("train_images", "train images"), ("val_images", "val images"), ("status", "status"),
    ],
    "kernels": [
        ("op", "op"), ("variant", "variant"), ("dtype", "dtype"), ("B", "B"), ("d", "d"), ("T", "T"),
        ("C", "C"), ("ms", "ms"), ("passes", "bytes counted"),
        ("GBps", "GB/s"), ("frac_copy", "of copy BW"), ("speedup_vs_eager", "x eager"),
        ("speedup_vs_compiled", "x compiled"), ("peak_MiB", "peak MiB"),
    ],
}

NO_GPU = ("**No GPU number has been measured yet.** No GPU has run this project: every figure a "
          "target names (images/s, MFU, the ratios to the eager, compiled and timm baselines, the "
          "kernels' share of copy bandwidth) is still to be measured by `bench/gpu_check.sh` on a "
          "lent H100 or H200 (bench/README.md, \"The GPU proof\"). The targets are in the "
          "benchmarks' output (`bench/train_step.py`, `bench/kernels.py`), never in the tests.")
HOW_TO = ("Run the benchmarks on a GPU (`python bench/kernels.py`, `python bench/data.py`, "
          "`python bench/train_step.py`; see bench/README.md), commit the files they write into "
          "bench/results/, then rerun `python bench/make_perf_section.py`.")


def load_runs(results_dir: Path) -> list[dict[str, Any]]:
    """Every parseable results file, as {"name", "meta", "rows", "path"}; broken files are skipped
    with a note on stderr so one bad file does not hide the rest."""
    runs = []
    # A folder bench/gpu_check.sh wrote ($OUT): its env.json names the benchmark of each file.
    names, env_meta = results_io.gpu_check_manifest(results_dir)
    for path in sorted(results_dir.glob("*.json")):
        lookup = dict(names or {})
        lookup.setdefault(path.name, path.stem.split("-")[0])
        try:
            data = results_io.load_results(path, lookup, env_meta)
        except (OSError, ValueError) as e:
            print(f"make_perf_section: skipping {path.name}: {e}", file=sys.stderr)
            continue
        if not isinstance(data.get("rows"), list):
            print(f"make_perf_section: skipping {path.name}: not a results_io file", file=sys.stderr)
            continue
        meta = data.get("meta") or {}
        runs.append({"name": data.get("name") or path.stem.split("-")[0], "meta": meta,
                     "rows": data["rows"], "path": path})
    return runs


def is_gpu_run(run: dict[str, Any]) -> bool:
    meta = run["meta"]
    return bool(meta.get("gpu")) and not meta.get("smoke", False)


# What identifies one measurement in a benchmark's rows: a newer run replaces an older run's row
# with the same key on the same GPU. A GPU session runs one benchmark as several commands (one
# model or size each), so "newest run wins" would hide all but the last command's rows.
ROW_KEYS: dict[str, tuple[str, ...]] = {
    # DiffMAE rows add their mask ratio and decoder (None on l-DAE rows, so those keys stay as they were).
    "train_step": ("model", "img", "patch", "precision", "batch", "mask_ratio", "decoder_kind", "variant"),
    "kernels": ("op", "variant", "dtype", "B", "d", "T", "C"),
}


def row_keys(name: str, rows: list[dict[str, Any]]) -> list[tuple[tuple, frozenset]]:
    """(key, peers) of each row. A train_step row's vs_* are ratios to the variants its run
    measured at the same (model, batch): its peers. A newer run hides an older row only if it
    measured the same key among at least the same peers, so a later run with another set (the
    ablations beside (d), say, or (a) alone) does not leave ratios to rows no longer shown."""
    keys = ROW_KEYS.get(name)
    if keys is None:  # unknown benchmark: the whole run is one measurement
        return [((), frozenset())] * len(rows)
    out = [tuple(str(r.get(k)) for k in keys) for r in rows]
    if name != "train_step":
        return [(k, frozenset()) for k in out]
    peers: dict[tuple, set] = {}
    for k in out:
        peers.setdefault(k[:-1], set()).add(k[-1])
    return [(k, frozenset(peers[k[:-1]])) for k in out]


def select(runs: list[dict[str, Any]], include_cpu: bool, all_runs: bool) -> list[dict[str, Any]]:
    """The runs to show: GPU runs (plus CPU ones if asked); unless all_runs, a row is left out
    when a newer run on the same device measured it again (see row_keys); runs left with no
    row are dropped. Ordered by benchmark name, then date."""
    keep = [r for r in runs if include_cpu or is_gpu_run(r)]
    keep.sort(key=lambda r: (r["name"], str(r["meta"].get("date", ""))))
    if all_runs:
        return keep
    claimed: dict[tuple, list[frozenset]] = {}
    out = []
    for r in reversed(keep):  # newest first
        keys = [((r["name"], device_of(r), k), peers) for k, peers in row_keys(r["name"], r["rows"])]
        rows = [row for row, (k, peers) in zip(r["rows"], keys)
                if not any(peers <= q for q in claimed.get(k, ()))]
        for k, peers in keys:
            claimed.setdefault(k, []).append(peers)
        if rows:
            out.append({**r, "rows": rows})
    return out[::-1]


def device_of(run: dict[str, Any]) -> str:
    meta = run["meta"]
    return str(meta.get("gpu") or meta.get("device") or f"CPU ({meta.get('cpu') or 'unknown'})")


def fmt(v: Any, key: str = "") -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v != v:
            return "nan"
        if key == "mfu" or key == "frac_copy":
            return f"{100 * v:.1f}%"
        if key.startswith(("vs_", "speedup")):
            return f"{v:.2f}x"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def columns_for(name: str, rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    present = {k for r in rows for k, v in r.items() if v not in (None, "")}
    if name in COLUMNS:
        return [(k, h) for k, h in COLUMNS[name] if k in present]
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols and k in present)
    return [(k, k) for k in cols]


def table(name: str, rows: list[dict[str, Any]]) -> str:
    cols = columns_for(name, rows)
    if not cols:
        return "(no rows)"
    out = ["| " + " | ".join(h for _, h in cols) + " |",
           "|" + "|".join("--:" if _numeric(rows, k) else ":--" for k, _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(k), k) for k, _ in cols) + " |")
    return "\n".join(out)


def _numeric(rows: list[dict[str, Any]], key: str) -> bool:
    vals = [r.get(key) for r in rows if r.get(key) is not None]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def train_step_headlines(rows: list[dict[str, Any]]) -> list[str]:
    """Per model: the fastest ldae-fast (d) row, and the ratios to (a)/(b)/(c) from the largest
    batch at which those baselines ran too (the biggest batches often fit only (d))."""
    lines = []
    models = []
    for r in rows:
        if r.get("model") not in models:
            models.append(r.get("model"))
    labels = (("vs_a", "eager (a)"), ("vs_b", "compiled (b)"), ("vs_c", "timm peer (c)"))
    for m in models:
        ours = [r for r in rows if r.get("model") == m and r.get("variant") == "d" and r.get("images_per_s")]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["images_per_s"])
        parts = [f"**{m}**: {fmt(best['images_per_s'])} images/s at micro-batch {best.get('batch')}"]
        if best.get("mfu") is not None:
            parts.append(f"MFU {fmt(best['mfu'], 'mfu')}")
        if best.get("peak_reserved_gib") is not None:
            parts.append(f"{fmt(best['peak_reserved_gib'])} GiB peak reserved")
        elif best.get("peak_mem_gib") is not None:
            parts.append(f"{fmt(best['peak_mem_gib'])} GiB peak")
        compared = [r for r in ours if any(r.get(k) is not None for k, _ in labels)]
        if compared:
            ref = max(compared, key=lambda r: (sum(r.get(k) is not None for k, _ in labels),
                                               r.get("batch") or 0))
            ratios = [f"{fmt(ref[k], k)} {label}" for k, label in labels if ref.get(k) is not None]
            parts.append(", ".join(ratios) + f" (at micro-batch {ref.get('batch')})")
        lines.append("- " + ", ".join(parts))
    return lines


def learn_headline(meta: dict[str, Any]) -> str:
    """learn_check's summary (its meta after import): the margins over the random-init floor."""
    sm = meta.get("summary")
    if not isinstance(sm, dict) or "knn_margin" not in sm:
        return ""

    def pm(mean, std):
        return f"{fmt(mean)}" + (f" ± {fmt(std)}" if isinstance(std, float) and std == std else "")

    shards = ", ".join(str(x) for x in (meta.get("train_shards") or []) + (meta.get("val_shards") or []))
    return (f"Pretrained minus the random-init floor (mean ± std over {sm.get('floor_seeds')} seeds: kNN "
            f"{pm(sm.get('floor_knn_mean'), sm.get('floor_knn_std'))}, probe "
            f"{pm(sm.get('floor_probe_mean'), sm.get('floor_probe_std'))}): kNN {sm['knn_margin']:+.2f}, probe "
            f"{sm.get('probe_margin', float('nan')):+.2f} points; chance {fmt(sm.get('chance'))}%"
            + (f"; pretraining budget {fmt(meta.get('budget_s'))} s" if meta.get("budget_s") is not None else "")
            + (f"; shards {shards}" if shards else "") + ".")


def _shown_path(path: Path) -> str:
    root = RESULTS_DIR.parent.parent
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def run_section(run: dict[str, Any]) -> str:
    meta, name, rows = run["meta"], run["name"], run["rows"]
    out = [f"### {name} — {device_of(run)}, {meta.get('date', 'date unknown')}", ""]
    versions = [f"{k} {meta[k]}" for k in ("torch", "triton", "cuda") if meta.get(k)]
    if meta.get("git_commit"):
        versions.append(f"commit {meta['git_commit']}")
    if versions:
        out += [", ".join(versions), ""]
    if meta.get("command"):
        out += ["```", str(meta["command"]), "```", ""]
    if name == "train_step":
        if meta.get("peak_tflops"):
            out.append(f"MFU against {fmt(meta['peak_tflops'])} TFLOP/s ({meta.get('peak_source', '')}); "
                       f"{meta.get('flop_count', '')}; {meta.get('precision', '')}.")
            out.append("")
        heads = train_step_headlines(rows)
        if heads:
            out += heads + [""]
    # The targets of issue 26, as the benchmark judged them on this run's rows.
    targets = meta.get("targets") or ([meta["target"]] if isinstance(meta.get("target"), dict) else [])
    if targets:
        out += ["Targets: " + "; ".join(f"{t.get('target')}: **{t.get('status')}** ({fmt(t.get('value'))})"
                                         for t in targets if isinstance(t, dict)), ""]
    if name == "learn_check":
        line = learn_headline(meta)
        if line:
            out += [line, ""]
    out += [table(name, rows), "", f"Source: `{_shown_path(run['path'])}`", ""]
    return "\n".join(out)


def summary(runs: list[dict[str, Any]]) -> str:
    """Headlines over every shown train_step run of a GPU: a session measures one model and
    batch per command, so the fastest (d) and the run where the baselines ran sit in different
    sections. Each ratio still comes from one run (its own row's vs_*)."""
    by_device: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r["name"] == "train_step":
            by_device.setdefault(device_of(r), []).extend(r["rows"])
    out = []
    for device, rows in by_device.items():
        heads = train_step_headlines(rows)
        if heads:
            out += [f"**train_step on {device}** (every run below):", "", *heads, ""]
    return "\n".join(out)


def render(results_dir: Path = RESULTS_DIR, include_cpu: bool = False, all_runs: bool = False) -> str:
    runs = select(load_runs(results_dir), include_cpu, all_runs)
    head = ["## Performance", "",
            "Generated by `python bench/make_perf_section.py` from the results files in "
            "`bench/results/`; what the columns mean is in `bench/README.md`.", ""]
    if not runs:
        return "\n".join(head + [NO_GPU, "", f"No GPU results are committed yet. {HOW_TO}", ""])
    top = summary(runs)
    return "\n".join(head) + "\n" + (top + "\n" if top else "") + "\n".join(run_section(r) for r in runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="default bench/results")
    ap.add_argument("--all", dest="all_runs", action="store_true",
                    help="every run, also rows a newer run on the same GPU measured again")
    ap.add_argument("--include-cpu", action="store_true", help="also CPU smoke runs (for checking)")
    ap.add_argument("--update-readme", type=Path, nargs="?", const=README, default=None,
                    help="replace the section between the perf markers of README.md instead of printing")
    args = ap.parse_args(argv)
    text = render(args.results_dir, args.include_cpu, args.all_runs)
    if args.update_readme is None:
        sys.stdout.write(text)
        return 0
    readme = args.update_readme.read_text()
    if BEGIN not in readme or END not in readme:
        print(f"{args.update_readme} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.update_readme.write_text(f"{head}{BEGIN}\n{text.rstrip()}\n{END}{tail}")
    print(f"updated {args.update_readme}")
    return 0


README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- perf:begin (generated: python bench/make_perf_section.py --update-readme) -->", "<!-- perf:end -->"


def readme_section(readme_text: str) -> str:
    """The generated part of README.md, for the test that keeps it in step with bench/results."""
    return readme_text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


if __name__ == "__main__":
    sys.exit(main())
