#!/usr/bin/env python
"""One table from several `bench/learn_check.py` runs that differ only in --seed (the pretraining
seed): the pretrained encoder per seed, mean ± std over the seeds, beside the random-init floors
and the raw-pixel floor (`--pixel-floor`) of all the runs; probe, centred, whitened and raw kNN
(a file written before the whitened kNN existed shows '-' there; `learn_check.py --eval-only`
fills it in).

A floor is one encoder (random-init seed s, or the raw pixels) measured on the runs' shared setup,
so every run that holds it measured the same thing: the files' floor rows are combined, one row per
floor (the union of their seeds, a number one file lacks taken from another), and the script
refuses when two files give a floor different numbers.

    python bench/learn_seeds.py runs/ti-s0.json runs/ti-s1.json runs/ti-s2.json

The runs must share their setup, shards and step count (pass --steps to learn_check so a loaded
machine's clock does not change the work); otherwise the script names what differs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from results_io import print_markdown

FLOORS = ("random-init", "raw pixels")
METRICS = ("probe_top1", "knn_top1", "knn_whitened_top1", "knn_raw_top1")


class SeedsError(ValueError):
    pass


def _same(docs: list[tuple[Path, dict[str, Any]]]) -> None:
    (p0, d0), rest = docs[0], docs[1:]
    for p, d in rest:
        for key in ("setup", "train_shards", "val_shards"):
            if d["meta"].get(key) != d0["meta"].get(key):
                raise SeedsError(f"{p} and {p0} differ in {key}: not seeds of one experiment")
        s, s0 = d["stages"].get("pretrain", {}), d0["stages"].get("pretrain", {})
        if s.get("steps") != s0.get("steps"):
            raise SeedsError(f"{p} ran {s.get('steps')} steps, {p0} {s0.get('steps')}: pass learn_check --steps")


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def _cell(r: dict[str, Any], key: str) -> str:
    """A number to two places; '-' where the run's file predates the field."""
    v = r.get(key)
    return "-" if v is None else f"{v:.2f}"


def _vals(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def floor_rows(docs: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every file's floor rows, one per (encoder, seed) in first-seen order; each number from the
    files that hold it, which must agree."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    source: dict[tuple[str, str, str], Path] = {}
    for p, d in docs:
        for r in d["rows"]:
            if r["encoder"] not in FLOORS:
                continue
            key = (r["encoder"], str(r["seed"]))
            row = merged.setdefault(key, dict(r))
            for k in METRICS:
                v, have = r.get(k), row.get(k)
                if v is None:
                    continue
                if have is None:
                    row[k] = v
                elif v != have:
                    name = r["encoder"] + (f" seed {r['seed']}" if r["encoder"] == "random-init" else "")
                    raise SeedsError(f"{p} and {source[(*key, k)]} disagree on the {name} floor ({k} {v} vs "
                                     f"{have}): not one measurement; pass the files whose floors agree")
                source.setdefault((*key, k), p)
    return list(merged.values())


def table(docs: list[tuple[Path, dict[str, Any]]]) -> str:
    pre = [(p, next(r for r in d["rows"] if r["encoder"] == "pretrained")) for p, d in docs]
    combined = floor_rows(docs)
    floors = [r for r in combined if r["encoder"] == "random-init"]
    raw = [r for r in combined if r["encoder"] == "raw pixels"]
    lines = ["| encoder | seed | probe top-1 | kNN top-1 (centred) | kNN top-1 (whitened) | kNN top-1 (raw) | "
             "images seen | pretraining |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def row(name: str, seed: Any, r: dict[str, Any], seen: Any, secs: str) -> str:
        return (f"| {name} | {seed} | " + " | ".join(_cell(r, k) for k in ("probe_top1", "knn_top1",
                "knn_whitened_top1", "knn_raw_top1")) + f" | {seen} | {secs} |")

    for _, r in pre:
        lines.append(row("pretrained", r["seed"], r, r["images_seen"], f"{r['train_s']} s"))
    for r in floors:
        lines.append(row("random-init", r["seed"], r, 0, "-"))
    for r in raw:
        lines.append(row("raw pixels", "-", r, 0, "-"))
    pre_rows = [r for _, r in pre]
    metrics = [("probe", "probe_top1"), ("kNN", "knn_top1"), ("whitened kNN", "knn_whitened_top1")]

    def stats(rows: list[dict[str, Any]]) -> str:
        return ", ".join(f"{name} {_ms(_vals(rows, k))}" for name, k in metrics if _vals(rows, k))

    lines.append("")
    summary = f"pretrained over {len(pre)} seeds: {stats(pre_rows)}"
    if floors:
        margins = ", ".join(f"{name} {statistics.mean(_vals(pre_rows, k)) - statistics.mean(_vals(floors, k)):+.2f}"
                            for name, k in metrics if _vals(pre_rows, k) and _vals(floors, k))
        summary += f"; random-init over {len(floors)} seeds: {stats(floors)}; margin of the means: {margins} points"
    chance = docs[0][1].get("summary", {}).get("chance")
    if chance:
        summary += f"; chance {chance:.2f}%"
    lines.append(summary + " (mean ± sample std; '-': the run's file has no such field). Written by "
                 "`bench/learn_seeds.py` from " + ", ".join(str(p) for p, _ in docs) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    try:
        docs = []
        for p in args.inputs:
            try:
                docs.append((p, json.loads(p.read_text())))
            except (OSError, json.JSONDecodeError) as e:
                raise SeedsError(f"{p}: not a readable learn_check JSON ({e})") from None
            if not any(r.get("encoder") == "pretrained" for r in docs[-1][1].get("rows", [])):
                raise SeedsError(f"{p}: no pretrained row (the run did not finish)")
        _same(docs)
        md = table(docs)
    except SeedsError as e:
        print(f"learn_seeds: {e}", file=sys.stderr)
        return 2
    print_markdown(md, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
