#!/usr/bin/env python
"""One table from several `bench/learn_check.py` runs that differ only in --seed (the pretraining
seed): the pretrained encoder per seed, mean ± std over the seeds, beside the random-init floors
and the raw-pixel floor (`--pixel-floor`) of the first run.

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


def table(docs: list[tuple[Path, dict[str, Any]]]) -> str:
    pre = [(p, next(r for r in d["rows"] if r["encoder"] == "pretrained")) for p, d in docs]
    floors = [r for r in docs[0][1]["rows"] if r["encoder"] == "random-init"]
    raw = [r for r in docs[0][1]["rows"] if r["encoder"] == "raw pixels"]
    lines = ["| encoder | seed | probe top-1 | kNN top-1 (centred) | kNN top-1 (raw) | images seen | pretraining |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for _, r in pre:
        lines.append(f"| pretrained | {r['seed']} | {r['probe_top1']:.2f} | {r['knn_top1']:.2f} | "
                     f"{r['knn_raw_top1']:.2f} | {r['images_seen']} | {r['train_s']} s |")
    for r in floors:
        lines.append(f"| random-init | {r['seed']} | {r['probe_top1']:.2f} | {r['knn_top1']:.2f} | "
                     f"{r['knn_raw_top1']:.2f} | 0 | - |")
    for r in raw:
        lines.append(f"| raw pixels | - | {r['probe_top1']:.2f} | {r['knn_top1']:.2f} | {r['knn_raw_top1']:.2f} | 0 | - |")
    pp, pk = [r["probe_top1"] for _, r in pre], [r["knn_top1"] for _, r in pre]
    lines.append("")
    summary = f"pretrained over {len(pre)} seeds: probe {_ms(pp)}, kNN {_ms(pk)}"
    if floors:
        fp, fk = [r["probe_top1"] for r in floors], [r["knn_top1"] for r in floors]
        summary += (f"; random-init over {len(floors)} seeds: probe {_ms(fp)}, kNN {_ms(fk)}; margin of the means: "
                    f"probe {statistics.mean(pp) - statistics.mean(fp):+.2f}, kNN "
                    f"{statistics.mean(pk) - statistics.mean(fk):+.2f} points")
    chance = docs[0][1].get("summary", {}).get("chance")
    if chance:
        summary += f"; chance {chance:.2f}%"
    lines.append(summary + " (mean ± sample std). Written by `bench/learn_seeds.py` from " +
                 ", ".join(str(p) for p, _ in docs) + ".")
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
    except SeedsError as e:
        print(f"learn_seeds: {e}", file=sys.stderr)
        return 2
    md = table(docs)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
