#!/usr/bin/env python
"""Assemble a seed table (markdown) from the `results.json` files demo runs write.

`python train.py --preset P --engine.seed=S ...` writes `<engine.out_dir>/results.json` with every
number it printed (ldae_fast.train.write_results). This prints one row per file, the mean and the
sample standard deviation over the files, and the commands that wrote them, so the seed tables in
docs/ are pasted from this output rather than typed:

    python bench/seed_table.py runs/demo-s0/results.json runs/demo-s1/results.json runs/demo-s2/results.json
    python bench/seed_table.py --title "DiffMAE demo, cross_self top-down" runs/dm-cs-s*/results.json
    python bench/seed_table.py --summary runs/diffmae-decoders/*/results.json

Every file must come from the same preset and settings except the seed, output directory and
run-time switches (engine.progress, engine.overwrite): otherwise the rows would not be seeds of
one experiment, and the script says which setting differs. With --summary the files are grouped
by their settings instead, one line per group (mean ± std over its seeds), each group labelled by
the settings that tell the groups apart. Settings are compared as this version reads them
(ldae_fast.config.migrate: a field that moved since, such as `model.decoder_kind` ->
`diffmae.decoder_kind`, is compared at its new place), so runs written before and after a
rename are seeds of one experiment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from results_io import print_markdown

# (key in results.json's "evaluation", column header)
COLUMNS = (
    ("probe_top1", "probe, pretrained"), ("random_top1", "probe, random-init"),
    ("raw_pixels_top1", "probe, raw pixels"), ("knn_top1", "kNN (centred), pretrained"),
    ("random_knn_top1", "kNN, random-init"), ("raw_pixels_knn_top1", "kNN, raw pixels"),
    ("knn_whitened_top1", "kNN (whitened), pretrained"), ("random_knn_whitened_top1", "kNN (whitened), random-init"),
    ("raw_pixels_knn_whitened_top1", "kNN (whitened), raw pixels"),
)
# Settings a seed of the same experiment may change.
FREE = {("engine", "seed"), ("engine", "out_dir"), ("engine", "progress"), ("engine", "overwrite"),
        ("engine", "resume")}


class TableError(ValueError):
    pass


def load(paths: list[Path]) -> list[dict[str, Any]]:
    recs = []
    for p in paths:
        try:
            rec = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TableError(f"{p}: not a readable results.json ({e})") from None
        if not isinstance(rec, dict) or "evaluation" not in rec or "config" not in rec:
            raise TableError(f"{p}: no 'evaluation' and 'config' (not written by train.write_results)")
        rec["config"] = _as_read_now(rec["config"], p)
        rec["_path"] = str(p)
        recs.append(rec)
    if not recs:
        raise TableError("no results.json given")
    return sorted(recs, key=lambda r: r.get("seed", 0))


def _as_read_now(config: dict[str, Any], path: Path) -> dict[str, Any]:
    import ldae_fast.methods  # noqa: F401 (registers the methods' sections, which reading a config needs)
    from ldae_fast.config import Config
    from ldae_fast.errors import UserError

    try:
        return Config.from_dict(config).to_dict()
    except (UserError, ValueError, TypeError) as e:
        raise TableError(f"{path}: its config does not load in this version ({e})") from None


def _settings(rec: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {(sec, k): v for sec, fields in rec["config"].items() if isinstance(fields, dict)
            for k, v in fields.items() if (sec, k) not in FREE}


def check_same_experiment(recs: list[dict[str, Any]]) -> None:
    base = _settings(recs[0])
    for rec in recs[1:]:
        other = _settings(rec)
        diff = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
        if diff:
            sec, k = diff[0]
            raise TableError(f"{rec['_path']} differs from {recs[0]['_path']} in {sec}.{k} "
                             f"({other.get(diff[0])!r} vs {base.get(diff[0])!r}): not seeds of one experiment")


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}%"


def table(recs: list[dict[str, Any]], title: str = "") -> str:
    cols = [(k, h) for k, h in COLUMNS if any(k in r["evaluation"] for r in recs)]
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines.append("| seed | " + " | ".join(h for _, h in cols) + " | pretraining |")
    lines.append("| ---: | " + " | ".join("---:" for _ in cols) + " | ---: |")
    for r in recs:
        ev, pt = r["evaluation"], r.get("pretraining", {})
        secs = pt.get("seconds")
        lines.append(f"| {r.get('seed')} | " + " | ".join(_fmt(ev.get(k)) for k, _ in cols)
                     + f" | {'-' if secs is None else f'{secs:.0f} s'} |")
    if len(recs) > 1:
        cells = []
        for k, _ in cols:
            vals = [r["evaluation"][k] for r in recs if r["evaluation"].get(k) is not None]
            cells.append(f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "-")
        lines.append("| mean ± std | " + " | ".join(cells) + " | |")
    ev0 = recs[0]["evaluation"]
    st = ev0.get("eval_settings", {})
    white = (" (and whitened with the train features' PCA)"
             if any("knn_whitened_top1" in r["evaluation"] for r in recs) else "")
    lines.append("")
    lines.append(f"Chance {ev0.get('chance', float('nan')):.1f}%; {st.get('train_images', '?')} train / "
                 f"{st.get('val_images', '?')} val images; probe {st.get('probe_epochs', '?')} epochs (blr "
                 f"{st.get('probe_blr', '?')}), kNN k={st.get('knn_k', '?')} on {st.get('knn_features', '?')} features"
                 f"{white}; "
                 f"'-': a file without that field; "
                 f"std is the sample standard deviation over {len(recs)} seed(s). Written by "
                 f"`bench/seed_table.py` from:")
    lines.append("")
    lines.append("```bash")
    for r in recs:
        lines.append("python train.py " + " ".join(r.get("argv", [])) + f"   # -> {r['_path']}")
    lines.append("```")
    return "\n".join(lines)


def summary(recs: list[dict[str, Any]], title: str = "") -> str:
    """One line per experiment (records grouped by their settings), mean ± std over its seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault(tuple(sorted(_settings(r).items(), key=lambda kv: kv[0])), []).append(r)
    keys = list(groups)
    all_settings = [dict(k) for k in keys]
    varying = sorted({k for s in all_settings for k in s if any(o.get(k) != s.get(k) for o in all_settings)})
    cols = [(k, h) for k, h in COLUMNS if any(k in r["evaluation"] for r in recs)]
    lines = [f"**{title}**", ""] if title else []
    lines.append("| experiment | seeds | " + " | ".join(h for _, h in cols) + " | pretraining (mean) |")
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in cols) + " | ---: |")
    for key, settings in zip(keys, all_settings):
        rs = groups[key]
        label = ", ".join(f"{sec}.{k}={settings.get((sec, k))}" for sec, k in varying) or "(one experiment)"
        cells = []
        for k, _ in cols:
            vals = [r["evaluation"][k] for r in rs if r["evaluation"].get(k) is not None]
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.1f}")
            else:
                cells.append(f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}")
        secs = [r.get("pretraining", {}).get("seconds") for r in rs]
        secs = [x for x in secs if x is not None]
        seeds = ",".join(str(r.get("seed")) for r in sorted(rs, key=lambda r: r.get("seed", 0)))
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells)
                     + f" | {f'{statistics.mean(secs):.0f} s' if secs else '-'} |")
    lines += ["", f"Percent top-1, mean ± sample std over the seeds listed (one seed: its value). Written by "
              f"`bench/seed_table.py --summary` from {len(recs)} results.json files:", "", "```"]
    lines += [r["_path"] for r in recs]
    lines.append("```")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="results.json files (one per seed)")
    ap.add_argument("--title", default="", help="a bold line above the table")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    ap.add_argument("--summary", action="store_true",
                    help="group the files by their settings: one line per experiment")
    args = ap.parse_args(argv)
    try:
        recs = load(args.results)
        if not args.summary:
            check_same_experiment(recs)
    except TableError as e:
        print(f"seed_table: {e}", file=sys.stderr)
        return 2
    print_markdown(summary(recs, args.title) if args.summary else table(recs, args.title), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
