"""Tables and PNG line plots of the study's metrics.

matplotlib is not a dependency of the project, so the plots are drawn with Pillow's ImageDraw:
a panel is a box with axes (linear or log), nice ticks, polylines and a legend. Enough for
metric-vs-iteration curves; not a plotting library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "signal": (31, 119, 180),
    "noise": (214, 39, 40),
    "diffusion": (44, 160, 44),
    "classifier": (148, 103, 189),
    "train": (255, 127, 14),
    "test": (23, 190, 207),
    "ref": (120, 120, 120),
}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: tuple[int, int, int]
    dashed: bool = False
    markers: bool = False


@dataclass
class Panel:
    title: str
    series: list[Series]
    xlabel: str = "iteration"
    ylabel: str = ""
    logx: bool = False
    logy: bool = False
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label), drawn dashed grey
    diagonal: float = 0.0  # if > 0, draw y = diagonal * x (for ratio-vs-n SNR^2 plots)
    ylim: tuple[float, float] | None = None


def _nice_linear_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1,) if b - a > 2 else (1, 2, 5)
    ticks = [m * 10.0**k for k in range(a, b + 1) for m in mults]
    return [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6 or abs(v) < 1e-2:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:g}"


def _limits(values: list[float], log: bool) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not vals:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if log:
        if hi / lo < 10:
            mid = math.sqrt(lo * hi)
            lo, hi = min(lo, mid / 3.2), max(hi, mid * 3.2)
        return lo / 1.15, hi * 1.15
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _dashed(draw: ImageDraw.ImageDraw, pts: list[tuple[float, float]], color, width: int) -> None:
    on, off = 7.0, 5.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        seg = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < seg:
            end = min(pos + on, seg)
            f0, f1 = pos / seg, end / seg
            draw.line(
                [(x0 + f0 * (x1 - x0), y0 + f0 * (y1 - y0)), (x0 + f1 * (x1 - x0), y0 + f1 * (y1 - y0))],
                fill=color,
                width=width,
            )
            pos += on + off


def draw_panel(img: Image.Image, box: tuple[int, int, int, int], panel: Panel) -> None:
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    font, small = _font(15), _font(12)
    left, right, top, bottom = x0 + 62, x1 - 12, y0 + 28, y1 - 44
    draw.text(((x0 + x1) / 2, y0 + 6), panel.title, fill="black", font=font, anchor="ma")

    xs_all = [x for s in panel.series for x in s.xs]
    ys_all = [y for s in panel.series for y in s.ys] + [h for h, _ in panel.hlines]
    xlo, xhi = _limits(xs_all, panel.logx)
    if not panel.logx and xs_all and min(xs_all) >= 0:
        xlo, xhi = 0.0, max(xs_all) if max(xs_all) > 0 else 1.0
    ylo, yhi = panel.ylim if panel.ylim else _limits(ys_all, panel.logy)
    if panel.diagonal:
        xlo = ylo = min(xlo, ylo)
        xhi = yhi = max(xhi, yhi)
    k = panel.diagonal

    def tx(v: float) -> float:
        if panel.logx:
            return left + (math.log10(v) - math.log10(xlo)) / (math.log10(xhi) - math.log10(xlo)) * (right - left)
        return left + (v - xlo) / (xhi - xlo) * (right - left)

    def ty(v: float) -> float:
        if panel.logy:
            return bottom - (math.log10(v) - math.log10(ylo)) / (math.log10(yhi) - math.log10(ylo)) * (bottom - top)
        return bottom - (v - ylo) / (yhi - ylo) * (bottom - top)

    xticks = _log_ticks(xlo, xhi) if panel.logx else _nice_linear_ticks(xlo, xhi)
    yticks = _log_ticks(ylo, yhi) if panel.logy else _nice_linear_ticks(ylo, yhi)
    for t in xticks:
        px = tx(t)
        draw.line([(px, top), (px, bottom)], fill=(232, 232, 232))
        draw.text((px, bottom + 4), _fmt(t), fill="black", font=small, anchor="ma")
    for t in yticks:
        py = ty(t)
        draw.line([(left, py), (right, py)], fill=(232, 232, 232))
        draw.text((left - 4, py), _fmt(t), fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, y1 - 18), panel.xlabel, fill="black", font=small, anchor="ma")
    if panel.ylabel:
        label = Image.new("RGBA", (int(bottom - top), 16), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((label.width / 2, 1), panel.ylabel, fill="black", font=small, anchor="ma")
        rotated = label.rotate(90, expand=True)
        img.paste(rotated, (x0 + 2, int(top)), rotated)

    def clip(pts):
        return [(min(max(px, left), right), min(max(py, top), bottom)) for px, py in pts]

    legend: list[tuple[str, tuple[int, int, int], bool]] = []
    if k:
        xa, xb = max(xlo, ylo / k), min(xhi, yhi / k)
        if xb > xa:
            _dashed(draw, clip([(tx(xa), ty(k * xa)), (tx(xb), ty(k * xb))]), COLORS["ref"], 1)
        legend.append((f"y = {k:g} x", COLORS["ref"], True))
    for h, lab in panel.hlines:
        _dashed(draw, clip([(left, ty(h)), (right, ty(h))]), COLORS["ref"], 1)
        if lab:
            legend.append((lab, COLORS["ref"], True))
    for s in panel.series:
        pts = [
            (tx(x), ty(y))
            for x, y in zip(s.xs, s.ys)
            if math.isfinite(y) and (y > 0 or not panel.logy) and (x > 0 or not panel.logx)
        ]
        pts = clip(pts)
        if len(pts) >= 2:
            if s.dashed:
                _dashed(draw, pts, s.color, 2)
            else:
                draw.line(pts, fill=s.color, width=2, joint="curve")
        if s.markers or len(pts) == 1:
            for px, py in pts:
                draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=s.color)
        legend.append((s.label, s.color, s.dashed))
    ly = top + 6
    for lab, color, dashed in legend:
        if dashed:
            _dashed(draw, [(left + 8, ly + 7), (left + 30, ly + 7)], color, 2)
        else:
            draw.line([(left + 8, ly + 7), (left + 30, ly + 7)], fill=color, width=3)
        draw.text((left + 36, ly), lab, fill="black", font=small)
        ly += 17


def save_figure(path: str | Path, panels: list[Panel], cols: int = 3, size=(460, 340), title: str = "") -> Path:
    rows = max(1, math.ceil(len(panels) / cols))
    cols = min(cols, len(panels)) or 1
    head = 30 if title else 0
    img = Image.new("RGB", (cols * size[0], rows * size[1] + head), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((img.width / 2, 6), title, fill="black", font=_font(17), anchor="ma")
    for k, panel in enumerate(panels):
        r, c = divmod(k, cols)
        box = (c * size[0], head + r * size[1], (c + 1) * size[0], head + (r + 1) * size[1])
        draw_panel(img, box, panel)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


# --- run-level figures and tables ------------------------------------------------------------------


def _hist(run: dict, model: str, key: str) -> tuple[list[float], list[float]]:
    h = run[model]["history"]
    return [r["iter"] for r in h], [r[key] for r in h]


def regime_figure(path: str | Path, run: dict) -> Path:
    """Three panels for one (regime, seed): diffusion features, classifier features, accuracy."""
    panels = []
    for model in ("diffusion", "classifier"):
        series = [
            Series("signal learning", *_hist(run, model, "signal"), COLORS["signal"]),
            Series("noise memorization", *_hist(run, model, "noise"), COLORS["noise"]),
        ]
        panels.append(Panel(f"{model}", series, ylabel="max_r |<w_r, v>|", logy=True))
    acc = [Series("train acc", *_hist(run, "classifier", "train_acc"), COLORS["train"])]
    if "test_acc" in run["classifier"]["history"][0]:
        acc.append(Series("test acc", *_hist(run, "classifier", "test_acc"), COLORS["test"]))
    panels.append(Panel("classifier accuracy", acc, ylabel="accuracy", ylim=(0.0, 1.05)))
    title = f"{run['regime']}  (n SNR^2 = {run['n_snr2']:.3g}, seed {run['seed']})"
    return save_figure(path, panels, cols=3, title=title)


def ratio_figure(path: str | Path, runs: list[dict]) -> Path:
    """Signal/noise ratio over training per regime, and final ratio against n SNR^2."""
    panels = []
    for model in ("diffusion", "classifier"):
        series = []
        palette = [
            (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
        ]
        regimes = list(dict.fromkeys(r["regime"] for r in runs))
        for k, reg in enumerate(regimes):
            first = next(r for r in runs if r["regime"] == reg)
            series.append(
                Series(f"n SNR^2={first['n_snr2']:.3g}", *_hist(first, model, "ratio"), palette[k % len(palette)])
            )
        panels.append(Panel(f"{model}: signal / noise", series, ylabel="ratio", logy=True, hlines=[(1.0, "")]))
    pts: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        for model in ("diffusion", "classifier"):
            pts.setdefault(f"{model} (end)", []).append((r["n_snr2"], r[model]["final"]["ratio"]))
        pts.setdefault("diffusion (growth phase)", []).append((r["n_snr2"], growth_ratio(r["diffusion"]["history"])))
    summary = []
    for label, color, dashed in (
        ("diffusion (end)", COLORS["diffusion"], False),
        ("diffusion (growth phase)", COLORS["diffusion"], True),
        ("classifier (end)", COLORS["classifier"], False),
    ):
        by_x: dict[float, list[float]] = {}
        for x, v in pts[label]:
            if math.isfinite(v):
                by_x.setdefault(round(x, 9), []).append(v)
        xs = sorted(by_x)
        means = [sum(by_x[x]) / len(by_x[x]) for x in xs]  # seeds averaged, as in the table
        summary.append(Series(label, xs, means, color, dashed=dashed, markers=True))
    panels.append(
        Panel("ratio vs n SNR^2", summary, xlabel="n SNR^2", ylabel="signal / noise",
              logx=True, logy=True, diagonal=1.0)
    )
    return save_figure(path, panels, cols=3, title="signal learning / noise memorization")


def growth_ratio(history: list[dict], factor: float = 5.0) -> float:
    """Increment ratio (signal - signal_0) / (noise - noise_0) over the growth phase.

    The end point is the last record where both metrics are still below `factor` times their
    initial values, i.e. before either saturates. The paper states a signal/noise ratio of
    Theta(n SNR^2) for the diffusion model, with no constant; the table divides by n SNR^2 so the
    constant our runs imply can be read off (a heuristic guess is 1/2: each mu_j sits in n/2
    samples, each xi_i in one).
    """
    s0, n0 = history[0]["signal"], history[0]["noise"]
    inside = [h for h in history if h["signal"] < factor * s0 and h["noise"] < factor * n0]
    end = inside[-1]
    dn = end["noise"] - n0
    if end["iter"] == 0 or dn <= 0:
        return math.nan
    return (end["signal"] - s0) / dn


def ratio_at(history: list[dict], fraction: float) -> float:
    """signal/noise at the record nearest fraction * (last iteration): is the run still moving?"""
    target = fraction * history[-1]["iter"]
    return min(history, key=lambda h: abs(h["iter"] - target))["ratio"]


def _mean_std(values: list[float]) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.3g}"
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{mean:.3g} ± {std:.2g}"


def summary_rows(runs: list[dict]) -> list[dict]:
    """One row per (regime, model): finals averaged over seeds (numbers kept for JSON)."""
    rows = []
    regimes = list(dict.fromkeys(r["regime"] for r in runs))
    for reg in regimes:
        group = [r for r in runs if r["regime"] == reg]
        for model in ("diffusion", "classifier"):
            finals = [r[model]["final"] for r in group]
            rows.append(
                {
                    "regime": reg,
                    "n_snr2": group[0]["n_snr2"],
                    "model": model,
                    "iters": group[0][model]["config"]["iters"],
                    "seeds": [r["seed"] for r in group],
                    "signal": [f["signal"] for f in finals],
                    "noise": [f["noise"] for f in finals],
                    "ratio": [f["ratio"] for f in finals],
                    "growth_ratio": [growth_ratio(r[model]["history"]) for r in group],
                    "ratio_half": [ratio_at(r[model]["history"], 0.5) for r in group],
                    "ratio_3q": [ratio_at(r[model]["history"], 0.75) for r in group],
                    "train_acc": [f.get("train_acc") for f in finals],
                    "test_acc": [f.get("test_acc") for f in finals],
                }
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| regime | n SNR² | model | iters | seeds | signal max_r\\|⟨w_r,μ⟩\\| | noise mean_i max_r\\|⟨w_r,ξ_i⟩\\| "
        "| signal / noise at ½ · ¾ of iters | signal / noise (end) | growth-phase Δsignal / Δnoise "
        "| growth ÷ n SNR² | train acc | test acc |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        regime = r["regime"].replace("|", "\\|")  # a bare "|" would end the table cell
        lines.append(
            f"| {regime} | {r['n_snr2']:.3g} | {r['model']} | {r['iters']} | {len(r['seeds'])} "
            f"| {_mean_std(r['signal'])} | {_mean_std(r['noise'])} "
            f"| {_mean_std(r['ratio_half'])} · {_mean_std(r['ratio_3q'])} | {_mean_std(r['ratio'])} "
            f"| {_mean_std(r['growth_ratio'])} | {_mean_std([g / r['n_snr2'] for g in r['growth_ratio']])} "
            f"| {_mean_std(r['train_acc'])} | {_mean_std(r['test_acc'])} |"
        )
    return "\n".join(lines)
