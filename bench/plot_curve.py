#!/usr/bin/env python
"""Probe and kNN top-1 against images seen, from the JSON that `bench/learn_check.py
--curve-every N` writes, as a PNG (PIL only: no plotting library is a dependency).

    python bench/plot_curve.py runs/ti-60min.json --out docs/data/tinyimagenet_curve.png

Two panels (linear probe, centred kNN). Each input file is one line through its
'pretrained@step' rows and its final 'pretrained' row; its random-init floor (mean ± std over the
floor seeds) is a shaded band, chance a dashed line. The points' values are printed too, so the
numbers under the picture can be pasted beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 520, 360, 56, 16, 30, 44
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def curve_points(doc: dict[str, Any], metric: str) -> list[tuple[int, float]]:
    rows = [r for r in doc["rows"] if r["encoder"] in ("pretrained", "pretrained@step")]
    return sorted((int(r["images_seen"]), float(r[metric])) for r in rows)


def floor_band(doc: dict[str, Any], metric: str) -> tuple[float, float] | None:
    vals = [float(r[metric]) for r in doc["rows"] if r["encoder"] == "random-init"]
    if not vals:
        return None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _panel(draw, font, x0: int, docs: list[dict[str, Any]], metric: str, title: str) -> None:
    pts = [p for d in docs for p in curve_points(d, metric)]
    bands = [b for d in docs if (b := floor_band(d, metric))]
    chance = docs[0].get("summary", {}).get("chance")
    ys = [y for _, y in pts] + [m + s for m, s in bands] + [m - s for m, s in bands] + ([chance] if chance else [])
    y_lo, y_hi = max(0.0, min(ys) - 2), max(ys) + 2
    x_hi = max(x for x, _ in pts) or 1
    left, right, top, bottom = x0 + PAD_L, x0 + W - PAD_R, PAD_T, H - PAD_B

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (right - left) * x / x_hi, bottom - (bottom - top) * (y - y_lo) / (y_hi - y_lo))

    draw.text((left, 8), title, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):  # y ticks
        y = y_lo + (y_hi - y_lo) * i / 4
        _, yy = px(0, y)
        draw.line([left - 4, yy, left, yy], fill="black")
        draw.text((x0 + 6, yy - 6), f"{y:.1f}", fill="black", font=font)
    for i in range(5):  # x ticks
        x = x_hi * i / 4
        xx, _ = px(x, y_lo)
        draw.line([xx, bottom, xx, bottom + 4], fill="black")
        draw.text((xx - 14, bottom + 6), f"{x / 1000:.0f}k", fill="black", font=font)
    draw.text(((left + right) // 2 - 40, H - 18), "images seen", fill="black", font=font)
    for i, d in enumerate(docs):
        c = COLOURS[i % len(COLOURS)]
        band = floor_band(d, metric)
        if band:
            m, s = band
            (_, y1), (_, y2) = px(0, m + s), px(0, m - s)
            light = tuple(int(v + (255 - v) * 0.8) for v in c)
            draw.rectangle([left + 1, y1, right - 1, max(y2, y1 + 1)], fill=light)
            _, ym = px(0, m)
            draw.line([left, ym, right, ym], fill=c, width=1)
        line = [px(x, y) for x, y in curve_points(d, metric)]
        if len(line) > 1:
            draw.line(line, fill=c, width=2)
        for xx, yy in line:
            draw.ellipse([xx - 3, yy - 3, xx + 3, yy + 3], fill=c)
    if chance:
        _, yc = px(0, chance)
        for xs in range(left, right, 10):
            draw.line([xs, yc, min(xs + 5, right), yc], fill=(120, 120, 120))


def plot(docs: list[dict[str, Any]], out: Path) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (2 * W, H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    _panel(draw, font, 0, docs, "probe_top1", "linear probe top-1 (%); band: random-init floor")
    _panel(draw, font, W, docs, "knn_top1", "kNN top-1, centred (%); dashed: chance")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path, help="learn_check JSON files (one line each)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    docs = []
    for p in args.inputs:
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"plot_curve: {p}: not a readable learn_check JSON ({e})", file=sys.stderr)
            return 2
        if not curve_points(doc, "probe_top1"):
            print(f"plot_curve: {p}: no pretrained rows", file=sys.stderr)
            return 2
        docs.append(doc)
    plot(docs, args.out)
    for p, d in zip(args.inputs, docs):
        band = floor_band(d, "probe_top1")
        print(f"{p}: images_seen, probe_top1, knn_top1 = "
              + "; ".join(f"{x}, {y:.2f}, {k:.2f}" for (x, y), (_, k)
                          in zip(curve_points(d, "probe_top1"), curve_points(d, "knn_top1")))
              + (f"; floor probe {band[0]:.2f} ± {band[1]:.2f}" if band else ""))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
