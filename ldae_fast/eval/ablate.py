"""`ldae-fast ablate`: the l-DAE trajectory (methods/ldae/trajectory.py, read through the methods registry) as numbers, row by row.

    ldae-fast ablate --rows pca-d8,pca-d32,predict-x0-w --data tiny-imagenet --budget 2000000 \
        --out runs/ablate --set model.size=S --set model.patch_size=8 --set data.img_size=64

Every row pretrains for the same number of images (--budget), fitting its tokenizer first when the
row's tokenizer needs one, then gets the quick linear probe (cached features) and kNN on its EMA
encoder (the trained weights where the run is too short for its EMA decay) at the row's probe
settings, beside the same architecture with random weights (the floor).
A row whose DIR/rows/NAME/result.json exists is skipped; a row interrupted mid-run resumes from its
run directory's newest checkpoint, written at least every 5 minutes (engine.ckpt_every_s=300). DIR/ablation.md holds the table (row, change, the paper's
accuracy, ours: probe and kNN, the floor, images seen, time) and DIR/ablation.png the plot shaped
like l-DAE's Fig. 6 (one bar pair per row: the paper's accuracy and ours). A row's time is its
pretraining and probing in the invocation that finished it (a resumed row counts from the resume).

--set overrides apply to every row after the row's own settings, so a row's own change (say the
pixel rows' image size) is lost where --set names the same field: scale rows down with fields the
rows do not change (model.size), or run those rows on their own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from ldae_fast.config import build_config
from ldae_fast.errors import ArgParser, UsageError
from ldae_fast.eval.command import command_main
from ldae_fast.methods import ablation_rows

ROWS = ablation_rows()

RESULT_FILE = "result.json"
ROW_CKPT_EVERY_S = 300


class AblateError(RuntimeError, UsageError):
    """A bad flag or row name; one line, exit code 2."""


def build_parser() -> ArgParser:
    ap = ArgParser(prog="ldae-fast ablate",
                   description="Pretrain each trajectory row for the same image budget, then probe and kNN "
                               "it beside a random-init floor; write ablation.md and ablation.png.")
    ap.add_argument("--rows", required=True, help=f"comma-separated row names ({len(ROWS)} rows: "
                                                  f"{', '.join(list(ROWS)[:4])}, ...; 'all' for every row)")
    ap.add_argument("--data", default="synthetic",
                    help="'synthetic', a preset with shards (tiny-imagenet) or a shard directory")
    ap.add_argument("--budget", type=int, required=True, help="training images seen per row")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config override applied to every row (repeatable)")
    ap.add_argument("--warmup-frac", type=float, default=0.1,
                    help="linear warm-up as a fraction of the budget (the rows' 100 epochs do not scale)")
    ap.add_argument("--max-train-images", type=int, default=None, help="probe / kNN train images")
    ap.add_argument("--max-val-images", type=int, default=None, help="probe / kNN val images")
    ap.add_argument("--probe-epochs", type=int, default=None, help="default eval.probe_epochs")
    return ap


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        k, eq, v = it.partition("=")
        if not eq or "." not in k:
            raise AblateError(f"--set {it!r} must look like section.field=value")
        out[k.strip()] = v
    return out


def row_config(name: str, data: str, budget: int, sets: dict[str, str], out: Path, warmup_frac: float):
    """The row's preset with --set, the data source, the budget as steps and the row's run dir."""
    from ldae_fast.eval.driver import with_data

    if name not in ROWS:
        raise AblateError(f"--rows: unknown row {name!r}; known: {', '.join(ROWS)}")
    run_dir = out / "rows" / name
    fixed = {"engine.out_dir": str(run_dir), "engine.resume": "auto", "engine.backend": "single",
             "eval.figure": "false", "eval.probe": "false", "engine.progress": "false"}
    # Checkpoint on the clock as well as by step, so a killed row costs minutes, not a row
    # (the rows' presets checkpoint every 2000 steps); --set may name another interval.
    cfg = build_config(name, {"engine.ckpt_every_s": str(ROW_CKPT_EVERY_S), **sets, **fixed})
    cfg, desc = with_data(cfg, data)
    if cfg.data.source == "synthetic" and "data.num_workers" not in sets:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, num_workers=0))
    steps = max(1, math.ceil(budget / cfg.global_batch()))
    warm = warmup_frac * steps * cfg.global_batch() / cfg.epoch_size()
    cfg = cfg.replace(engine=dataclasses.replace(cfg.engine, steps=steps),
                      optim=dataclasses.replace(cfg.optim, warmup_epochs=warm))
    return cfg, desc


def _probe(cfg, ckpt: Path, args, log) -> dict:
    """Quick probe + kNN of the EMA encoder and of a random-init one, at the row's probe settings."""
    from ldae_fast.data import build_eval_arrays

    from .driver import _random_model
    from .features import extract_features, probe_encoder, probe_view
    from .knn import knn_classify
    from .linear_probe import num_classes_of, train_head_cached
    from .reader import load_for_eval

    # An EMA of decay 0.9999 over a few hundred steps is still mostly the random init: evaluate it
    # only once the run is several EMA horizons long, else the trained weights.
    ema = cfg.optim.ema_decay > 0 and cfg.engine.steps * (1 - cfg.optim.ema_decay) >= 5
    _, model, method = load_for_eval(ckpt, use_ema=ema)
    train = build_eval_arrays(cfg, "train", args.max_train_images)
    val = build_eval_arrays(cfg, "val", args.max_val_images)
    C = num_classes_of(train[1], val[1])
    bs = min(cfg.eval.probe_batch_size, 1024)
    out = {}
    for name, net in (("ours", model), ("floor", _random_model(cfg))):
        view = probe_view(probe_encoder(net.eval(), cfg), cfg, method)
        ftr = extract_features(view, train[0], batch_size=bs)
        fva = extract_features(view, val[0], batch_size=bs)
        res = train_head_cached(ftr, train[1], fva, val[1], num_classes=C,
                                epochs=args.probe_epochs or cfg.eval.probe_epochs, batch_size=bs,
                                blr=cfg.eval.probe_blr, seed=cfg.engine.seed)
        k = int(cfg.eval.knn_k.split(",")[0])
        kn = knn_classify(ftr, train[1], fva, val[1], ks=[k], num_classes=C)
        out[name] = {"probe": res["top1"], "knn": next(iter(kn.values()))["top1"]}
        log(f"{name}: probe {res['top1']:.2f}, kNN {out[name]['knn']:.2f}")
    return dict(weights="EMA" if ema else "trained (the run is short for its EMA)", probe=out["ours"]["probe"], knn=out["ours"]["knn"], floor_probe=out["floor"]["probe"],
                floor_knn=out["floor"]["knn"], train_images=int(train[0].shape[0]),
                val_images=int(val[0].shape[0]), num_classes=C)


def run_row(name: str, args, sets: dict[str, str], out: Path, log) -> dict:
    from ldae_fast.engine.loop import train

    res_path = out / "rows" / name / RESULT_FILE
    if res_path.is_file():
        log(f"{name}: {res_path} exists, skipped")
        return json.loads(res_path.read_text())
    cfg, desc = row_config(name, args.data, args.budget, sets, out, args.warmup_frac)
    log(f"{name}: {ROWS[name].change}; {cfg.engine.steps} steps x {cfg.global_batch()} images, data {desc}")
    t0 = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t0
    ckpt = Path(cfg.engine.out_dir)
    t1 = time.perf_counter()
    scores = _probe(cfg, ckpt, args, log)
    row = ROWS[name]
    record = dict(row=name, change=row.change, source=row.source, paper_acc=row.paper_acc, note=row.note,
                  images_seen=cfg.engine.steps * cfg.global_batch(), steps=cfg.engine.steps,
                  train_seconds=train_s, probe_seconds=time.perf_counter() - t1,
                  final_loss=result.final_loss, data=desc, **scores)
    res_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(records: list[dict], meta: dict) -> str:
    lines = [f"# l-DAE trajectory ablation ({meta['data']}, {meta['budget']:,} images per row)", "",
             f"Command: `{meta['command']}`", "",
             "Paper: l-DAE (arXiv 2401.14404) linear-probe top-1 on ImageNet with DiT-L halves, 400 epochs; "
             "ours: quick linear probe (cached features) and kNN (k = first of eval.knn_k) at the row's "
             "eval.probe_t / probe_input / probe_depth; floor: the same architecture with random weights "
             "(probe / kNN). Different data and scale: compare the order of rows, not the numbers.", "",
             "| row | change | paper | ours probe | ours kNN | floor probe / kNN | images seen | time |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        t = r["train_seconds"] + r["probe_seconds"]
        lines.append(f"| {r['row']} | {r['change']} | {_fmt(r['paper_acc'])} | {r['probe']:.2f} | {r['knn']:.2f} | "
                     f"{r['floor_probe']:.2f} / {r['floor_knn']:.2f} | {r['images_seen']:,} | "
                     f"{t:.0f} s |")
    notes = [f"- {r['row']}: {r['note']}" for r in records if r.get("note")]
    notes += [f"- {r['row']}: evaluated the {r['weights']} weights" for r in records
              if r.get("weights", "EMA") != "EMA"]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> Path:
    """Fig. 6's shape: one line per row top to bottom, the paper's bar above ours (probe), the
    floor as a tick; drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw

    left, bar_w, row_h, top = 260, 420, 34, 30
    W, H = left + bar_w + 80, top + row_h * len(records) + 30
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), "linear probe top-1 (%): paper (grey), ours (blue), random-init floor (red tick)", fill="black")
    for i, r in enumerate(records):
        y = top + i * row_h
        d.text((10, y + 10), r["row"][:40], fill="black")
        for j, (v, colour) in enumerate(((r["paper_acc"], (170, 170, 170)), (r["probe"], (60, 110, 200)))):
            if v is None:
                continue
            x1 = left + int(bar_w * max(0.0, min(v, 100.0)) / 100)
            d.rectangle([left, y + 4 + 13 * j, x1, y + 15 + 13 * j], fill=colour)
            d.text((x1 + 4, y + 3 + 13 * j), f"{v:.1f}", fill="black")
        xf = left + int(bar_w * max(0.0, min(r["floor_probe"], 100.0)) / 100)
        d.line([xf, y + 2, xf, y + 30], fill=(200, 40, 40), width=2)
    d.line([left, top - 2, left, H - 25], fill="black")
    img.save(path)
    return path


def run(args) -> dict:
    import torch

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[ablate {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    names = list(ROWS) if args.rows.strip() == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    if not names:
        raise AblateError("--rows names no row")
    bad = [n for n in names if n not in ROWS]
    if bad:
        raise AblateError(f"--rows: unknown row(s) {', '.join(bad)}; known: {', '.join(ROWS)}")
    if args.budget < 1:
        raise AblateError(f"--budget {args.budget} must be >= 1 image")
    sets = _parse_sets(args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = [run_row(n, args, sets, out, log) for n in names]
    meta = dict(data=args.data, budget=args.budget, rows=names, sets=sets,
                command="ldae-fast ablate " + " ".join(getattr(args, "argv", [])), torch=torch.__version__)
    (out / "ablation.md").write_text(markdown(records, meta))
    (out / "ablation.json").write_text(json.dumps(dict(meta, records=records), indent=2) + "\n")
    png = plot(records, out / "ablation.png")
    log(f"wrote {out / 'ablation.md'} and {png}")
    return dict(records=records, out=str(out))


def main(argv: Optional[list[str]] = None) -> int:
    return command_main(argv, "ablate", build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
