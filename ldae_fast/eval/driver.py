"""`ldae-fast eval`: run evaluation protocols on a checkpoint and write one table.

    ldae-fast eval --checkpoint runs/demo/checkpoints/last --data tiny-imagenet \
        --protocols linear-fast,knn,linear,finetune --max-train-images 20000 --out runs/eval/demo

Every protocol also runs on the same encoder architecture with random weights (seeded like a
fresh `build_model`), and that row sits under the checkpoint's row: a number without its floor
says little at small scale, where a random ViT already gets well above chance.
Writes eval.md (the table) and eval.json (rows + settings) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import sys
import time
from pathlib import Path
from typing import Optional

from ldae_fast import methods  # noqa: F401 (registers the methods' config sections, names and presets)
from ldae_fast.config import PRESETS, preset_data_path
from ldae_fast.errors import ArgParser, FileProblem, UsageError, finite_float
from ldae_fast.eval.command import command_main

# torch and the protocols are imported by the functions that run them: `ldae-fast eval --help` and
# usage errors answer before torch is imported.

PROTOCOLS = ("linear-fast", "knn", "linear", "finetune", "figure")
DEFAULT_TIMEOUT_MIN = 120.0
"""--dist-timeout: long enough for a rank to wait out another's share of a long head fit or pass."""


class EvalError(RuntimeError, UsageError):
    """A user-facing problem (bad flag, missing data); printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    ap = ArgParser(
        prog="ldae-fast eval",
        description="Linear probe / kNN / fine-tuning / the method's figure of a checkpoint, "
                    "each beside the same architecture with random weights.")
    ap.add_argument("--checkpoint", required=True,
                    help="single-device checkpoint (dir or file), DeepSpeed checkpoint dir, or an "
                         "exported encoder .safetensors")
    ap.add_argument("--data", default=None,
                    help="'synthetic', a preset with shards (e.g. tiny-imagenet), a directory of "
                         "train-*.tar[.gz] / val-*.tar[.gz] shards, or a train shard pattern "
                         "(then --val-data); default: the checkpoint's own data settings")
    ap.add_argument("--val-data", default=None, help="validation shard pattern (with a pattern --data)")
    ap.add_argument("--protocols", default="linear-fast,knn",
                    help=f"comma-separated, from: {', '.join(PROTOCOLS)}")
    ap.add_argument("--max-train-images", type=int, default=None)
    ap.add_argument("--max-val-images", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs of every trained protocol (defaults: linear-fast eval.probe_epochs, "
                         "linear 90, finetune 100)")
    ap.add_argument("--finetune-epochs", type=int, default=None, help="overrides --epochs for finetune")
    ap.add_argument("--finetune-steps", type=int, default=0,
                    help="stop fine-tuning after this many steps (0: full schedule)")
    ap.add_argument("--finetune-batch-size", type=int, default=None,
                    help="default the method's recipe's (1024: l-DAE App. B, DiffMAE Table 1b, MAE's paper)")
    ap.add_argument("--finetune-head-init", choices=("mae", "printed"), default="mae",
                    help="std of the fresh classifier: 'mae' 2e-5 (MAE's, default), 'printed' 2^-5 "
                         "(DiffMAE's supplement as printed; docs/diffmae.md)")
    ap.add_argument("--finetune-dir", default=None,
                    help="finetune on shards: checkpoint directory (default <out>/finetune); a rerun resumes")
    ap.add_argument("--finetune-ckpt-every", type=int, default=100,
                    help="finetune on shards: checkpoint every N steps")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="linear-probe batch (default eval.probe_batch_size)")
    ap.add_argument("--blr", type=finite_float, default=None, help="linear-probe base lr (default eval.probe_blr)")
    ap.add_argument("--pool", choices=("avg", "cls"), default="avg", help="feature pooling")
    ap.add_argument("--probe-t", type=int, default=None,
                    help="noise step (of noise.num_timesteps) the probe and kNN condition on "
                         "(default eval.probe_t: 10, l-DAE App. A)")
    ap.add_argument("--probe-sigma", type=finite_float, default=None,
                    help="condition on this sigma instead of the schedule's at --probe-t")
    ap.add_argument("--probe-input", choices=("clean", "noisy"), default=None,
                    help="clean image or noised at that level (default eval.probe_input)")
    ap.add_argument("--probe-depth", type=int, default=None,
                    help="probe after the first k encoder blocks (default eval.probe_depth, 0: all)")
    ap.add_argument("--knn-k", default=None, help="comma-separated k (default eval.knn_k)")
    ap.add_argument("--figure-images", type=int, default=8, help="images in the figure")
    ap.add_argument("--num-workers", type=int, default=None,
                    help="fine-tuning augmentation workers (default data.num_workers)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--seed", type=int, default=0, help="seed of the probes and fine-tuning")
    ap.add_argument("--no-baseline", action="store_true", help="skip the random-weights rows")
    ap.add_argument("--out", default=None, help="output dir (default runs/eval/<checkpoint name>)")
    sc = ap.add_argument_group("streaming (shards: linear-fast, knn, linear, finetune; docs/eval.md)")
    sc.add_argument("--in-memory", action="store_true",
                    help="decode the capped splits into RAM instead of streaming them (small sets)")
    sc.add_argument("--readers", type=int, default=None,
                    help="logical readers per split, a multiple of the rank count; the global batch's "
                         "content depends on this, not on ranks or workers (default: the smallest "
                         "multiple of ranks x workers >= 16; fix it to compare or resume runs on "
                         "other rank counts)")
    sc.add_argument("--micro-batch", type=int, default=256,
                    help="images per encoder forward (finetune: per forward and backward); the global "
                         "batch is ranks x micro x accumulation")
    sc.add_argument("--feature-store", default=None,
                    help="feature store root (default <out>/features); reused when nothing changed")
    sc.add_argument("--store-dtype", choices=("fp16", "bf16"), default="fp16")
    sc.add_argument("--blrs", default=None,
                    help="linear-fast: comma-separated base lrs, one head each, chosen on a held-out "
                         "10%% of train (default 0.01,0.03,0.1,0.3,1, or --blr alone)")
    sc.add_argument("--probe-depths", default=None,
                    help="linear-fast: sweep the probe over these block depths k (comma-separated, 0: all "
                         "the encoder's; l-DAE App. A: 9,10,11,12,13,14,15), every k read from one forward "
                         "per image and t; one store and one row per (k, t), and an App. A table (sweep.md)")
    sc.add_argument("--probe-ts", default=None,
                    help="linear-fast: sweep the probe over these noise steps t (l-DAE App. A: 0,10,20,40,80); "
                         "one forward per image and t (t changes what every block reads)")
    sc.add_argument("--holdout", type=finite_float, default=0.1,
                    help="linear-fast: fraction of train held out to pick the lr")
    sc.add_argument("--knn-rows", default="raw,centred,whitened",
                    help="kNN feature rows, each its own table row: raw, centred, whitened")
    sc.add_argument("--probe-dir", default=None,
                    help="linear: checkpoint directory of the probe (default <out>/probe); a rerun resumes")
    sc.add_argument("--probe-ckpt-every", type=int, default=100, help="linear: checkpoint every N steps")
    sc.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel floor rows")
    sc.add_argument("--dist-timeout", type=finite_float, default=DEFAULT_TIMEOUT_MIN,
                    help="minutes a rank waits in a collective before the run is stopped (torchrun; "
                         "NCCL's own default is 10, shorter than a long head fit or a slow rank's share)")
    return ap


def _make_log():
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[eval {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    return log


def _with_probe_flags(cfg, args):
    """cfg with the --probe-* flags in its eval section (validated like config values)."""
    from ldae_fast.config import EvalConfig

    over = {k: v for k, v in (("probe_t", args.probe_t), ("probe_sigma", args.probe_sigma),
                              ("probe_input", args.probe_input), ("probe_depth", args.probe_depth))
            if v is not None}
    if not over:
        return cfg
    ev = EvalConfig(**{**dataclasses.asdict(cfg.eval), **over})
    return cfg.replace(eval=ev)


def _sweep_plans(args, models, cfg, method, device, streamed, protocols) -> dict:
    """--probe-depths / --probe-ts: the sweep (eval/sweep.py) of every encoder but the pixels."""
    if args.probe_depths is None and args.probe_ts is None:
        return {}
    from .sweep import parse_ints, plan

    if "linear-fast" not in protocols:
        raise EvalError("--probe-depths / --probe-ts sweep the linear-fast probe: add linear-fast to --protocols")
    if "linear-fast" not in streamed:
        raise EvalError("--probe-depths / --probe-ts write the feature store, which reads shards: pass --data "
                        "with shards and without --in-memory")
    try:
        depths = parse_ints("--probe-depths", args.probe_depths)
        ts = parse_ints("--probe-ts", args.probe_ts)
        return {name: plan(m, cfg, method, depths, ts, device) for name, m in models}
    except ValueError as e:
        raise EvalError(str(e) if str(e).startswith("--") else f"--probe-depths / --probe-ts: {e}") from None


def _probe_view(model, cfg, method, device):
    from .features import probe_encoder, probe_view

    if method is None:
        # An exported encoder: its conditioning is folded at sigma = 0 and it has no tokenizer.
        if cfg.eval.probe_input == "noisy" or cfg.eval.probe_depth:
            raise EvalError("--probe-input noisy and --probe-depth need a training checkpoint; an exported "
                            "encoder has no tokenizer and its conditioning is folded at sigma = 0")
        return model.encoder
    try:
        enc = probe_encoder(model, cfg)
    except ValueError as e:
        raise EvalError(f"--probe-depth: {e}") from None
    return probe_view(enc, cfg, method.to(device))


def _load_checkpoint(path: str):
    from .reader import load_for_eval

    try:
        return load_for_eval(path, flag="--checkpoint")
    except FileNotFoundError as e:
        raise FileProblem(str(e)) from None


def _random_model(cfg):
    """The checkpoint's architecture, initialised as a fresh run with the same seed would be."""
    import torch

    from ldae_fast.methods import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.engine.seed)
        return build_model(cfg)


def _shard_pattern(d: Path, split: str) -> str:
    rx = re.compile(rf"^{split}-(\d+)(\.tar(?:\.gz)?)$")
    found = sorted((m.group(1), m.group(2)) for f in d.iterdir() if (m := rx.match(f.name)))
    if not found:
        raise EvalError(f"no {split}-NNNNNN.tar[.gz] shards in {d}")
    nums, suffixes = [n for n, _ in found], {s for _, s in found}
    width = {len(n) for n in nums}
    ints = [int(n) for n in nums]
    if len(suffixes) > 1 or len(width) > 1 or ints != list(range(ints[0], ints[0] + len(ints))):
        raise EvalError(f"{split} shards in {d} are not one contiguous numbered series; "
                        f"pass a pattern with --data/--val-data")
    sfx = suffixes.pop()
    if len(nums) == 1:
        return str(d / f"{split}-{nums[0]}{sfx}")
    return str(d / f"{split}-{{{nums[0]}..{nums[-1]}}}{sfx}")


def with_data(cfg, data: Optional[str], val_data: Optional[str] = None,
              max_train: Optional[int] = None):
    """The checkpoint's config with its data source swapped for --data; the image size, the
    model and the tokenizer stay the checkpoint's."""
    if data is None:
        return cfg, f"{cfg.data.source} (from the checkpoint)"
    d = cfg.data
    shards = "wds-video" if d.num_frames else "wds"  # a video checkpoint reads clip shards
    if data == "synthetic":
        new, desc = dataclasses.replace(d, source="synthetic"), "synthetic"
    elif data in PRESETS:
        p = PRESETS[data]
        if p.get("data.source", "synthetic") != "wds":
            new, desc = dataclasses.replace(d, source="synthetic"), f"synthetic (preset {data})"
        else:
            new = dataclasses.replace(
                d, source="wds", train_shards=preset_data_path(p["data.train_shards"]),
                val_shards=preset_data_path(p["data.val_shards"]),
                epoch_size=p.get("data.epoch_size", d.epoch_size))
            desc = f"preset {data}"
    elif Path(data).is_dir():
        new = dataclasses.replace(d, source=shards, train_shards=_shard_pattern(Path(data), "train"),
                                  val_shards=_shard_pattern(Path(data), "val"), epoch_size=0)
        desc = str(data)
    else:
        if not val_data:
            raise EvalError(f"--data {data!r} is neither 'synthetic', a preset with shards "
                            f"({', '.join(k for k, v in PRESETS.items() if 'data.train_shards' in v)}) "
                            f"nor a directory; a shard pattern needs --val-data too")
        new = dataclasses.replace(d, source=shards, train_shards=data, val_shards=val_data, epoch_size=0)
        desc = f"{data} | {val_data}"
    if new.source in ("wds", "wds-video") and new.epoch_size <= 0:
        # Other shards than the checkpoint's: its epoch describes its pretraining data, not these.
        # Validation wants an epoch size for streaming training; 1 (or the cap) tells evaluation
        # to count the shards' samples (StreamingEval.num_train).
        new = dataclasses.replace(new, epoch_size=max_train or 1)
    return cfg.replace(data=new), desc


def _fmt_time(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _fmt_epochs(e) -> str:
    if e is None:
        return "-"
    return f"{e:.3g}" if isinstance(e, (int, float)) else str(e)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| protocol | encoder | epochs | top-1 | top-5 | feature dim | time |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['protocol']} | {r['encoder']} | {_fmt_epochs(r.get('epochs'))} | "
                     f"{r['top1']:.2f} | {r['top5']:.2f} | {r['feature_dim']} | "
                     f"{_fmt_time(r['seconds'])} |")
    return "\n".join(lines)


def _row(protocol: str, encoder: str, res: dict, **extra) -> dict:
    row = dict(protocol=protocol, encoder=encoder, epochs=res.get("epochs"), top1=res["top1"],
               top5=res["top5"], feature_dim=res.get("feature_dim"), seconds=res["seconds"])
    row.update(extra)
    return row


def run(args) -> dict:
    import torch

    from .features import extract_features, feature_dim, feature_settings, probe_note
    from .linear_probe import FAST_PROTOCOL, FULL_PROTOCOL, num_classes_of, train_head_cached
    from .rows import pca_rows

    log = _make_log()
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise EvalError(f"unknown protocol(s) {bad}; choose from {', '.join(PROTOCOLS)}")
    from ldae_fast.data import build_eval_arrays

    from . import dist as edist
    device = _rank_device(args.device)
    if not args.dist_timeout > 0:
        raise EvalError(f"--dist-timeout {args.dist_timeout}: minutes, > 0")
    ranks = edist.init_from_env(device, timeout_min=args.dist_timeout)
    if not ranks.main:
        log = _quiet

    log(f"loading {args.checkpoint}")
    cfg, model, method = _load_checkpoint(args.checkpoint)
    on_images = [p for p in protocols if p not in ("figure", "finetune")]
    if cfg.model.num_frames and on_images:
        raise EvalError(f"--protocols {','.join(on_images)}: these take images, and {args.checkpoint} is a "
                        f"video encoder (model.num_frames={cfg.model.num_frames}); a video encoder takes "
                        "finetune and figure")
    cfg, data_desc = with_data(cfg, args.data, args.val_data, args.max_train_images)
    if cfg.model.num_frames and "finetune" in protocols and (cfg.data.source != "wds-video" or args.in_memory):
        raise EvalError(f"--protocols finetune: a video encoder fine-tunes on clip shards (data.source="
                        f"'wds-video'), read as a stream; {data_desc} is not (pass --data with a directory of "
                        "train-*/val-* clip shards; `ldae-fast write-video-shards` writes them)")
    log(f"model {cfg.model.size} (width {cfg.model.width}, {cfg.model.encoder_depth} encoder blocks, "
        f"patch {cfg.model.patch_size}), images {cfg.data.img_size}px, data {data_desc}, device {device}"
        + (f", rank {ranks.rank} of {ranks.world_size}" if ranks.distributed else ""))
    out = Path(args.out) if args.out else Path("runs") / "eval" / Path(args.checkpoint).stem

    streaming = cfg.data.source in ("wds", "wds-video") and not args.in_memory
    streamed = [p for p in protocols if p in STREAMED] if streaming else []
    in_ram = [p for p in protocols if p not in streamed and p != "figure"]
    if ranks.distributed and in_ram:
        raise EvalError(f"--protocols {','.join(in_ram)}: not data-parallel"
                        + ("" if streaming else " on in-memory data (--in-memory or synthetic data)")
                        + "; run it on one process, or these protocols on shards under torchrun")
    train = val = None
    C = 0
    if in_ram:
        t = time.perf_counter()
        train = build_eval_arrays(cfg, "train", args.max_train_images)
        val = build_eval_arrays(cfg, "val", args.max_val_images)
        C = num_classes_of(train[1], val[1])
        log(f"data: {train[0].shape[0]} train / {val[0].shape[0]} val images, {C} classes "
            f"({(train[0].numel() + val[0].numel()) * 4 / 2**30:.2f} GiB, {time.perf_counter() - t:.1f}s)")

    cfg = _with_probe_flags(cfg, args)
    models = [("checkpoint", model)]
    if not args.no_baseline and any(p != "figure" for p in protocols):
        models.append(("random init", _random_model(cfg)))
    for _, m in models:
        m.to(device)
    encoders = [(name, m.encoder) for name, m in models]
    # The probes see the network at the configured t, input and depth; fine-tuning the bare encoder.
    probing = [p for p in protocols if p not in ("figure", "finetune")]
    views = {name: _probe_view(m, cfg, method, device) for name, m in models} if probing else {}
    if probing:
        log(f"probe: {probe_note(cfg)}")

    sweeps = _sweep_plans(args, models, cfg, method, device, streamed, protocols)
    sweep_records: list[dict] = []
    bs = args.batch_size or cfg.eval.probe_batch_size
    blr = args.blr or cfg.eval.probe_blr
    ks = [int(k) for k in (args.knn_k or cfg.eval.knn_k).split(",") if k.strip()]
    feats: dict[str, tuple] = {}
    runner = _streaming_runner(cfg, args, views, out, device, log) if streamed else None
    if runner is not None and not args.no_pixels and any(p in ("linear-fast", "knn") for p in streamed):
        from .scale import PixelView

        runner.views["pixels"] = PixelView(cfg.data.img_size)

    # The raw-pixel floors of the in-RAM tables (the streamed ones: runner.views['pixels']): the
    # pixels themselves and their PCA at the checkpoint's feature width.
    floors: list[tuple[str, object]] = []
    if in_ram and not args.no_pixels and any(p in ("linear-fast", "knn") for p in in_ram):
        from .scale import PixelView

        pv = PixelView(cfg.data.img_size)
        floors = [("pixels", pv), (f"pixels (PCA {feature_dim(views['checkpoint'])})", pv)]

    def cached(name, enc):
        # linear-fast and knn read the same un-augmented features: extract once per encoder, and
        # charge the extraction to each row, since each protocol alone would pay it.
        if name not in feats:
            t0 = time.perf_counter()
            if name.startswith("pixels (PCA "):
                ptr, pva, tp = cached("pixels", enc)
                rmap = pca_rows(ptr, feature_dim(views["checkpoint"]))
                feats[name] = (rmap(ptr), rmap(pva), tp + time.perf_counter() - t0)
                return feats[name]
            view = enc if name == "pixels" else views[name]
            ftr = extract_features(view, train[0], batch_size=bs, pool=args.pool, log=log,
                                   desc=f"{name} train features")
            fva = extract_features(view, val[0], batch_size=bs, pool=args.pool, log=log,
                                   desc=f"{name} val features")
            feats[name] = (ftr, fva, time.perf_counter() - t0)
            log(f"{name}: features {tuple(ftr.shape)} in {feats[name][2]:.1f}s")
        return feats[name]

    rows: list[dict] = []
    for proto in protocols:
        if proto == "figure":
            continue
        if proto == "finetune" and proto in streamed:
            for name, enc in encoders:
                log(f"== finetune on {name} (streamed)")
                rows.extend(_finetune_rows(cfg, args, runner, name, enc, method, out, device, log))
            continue
        if proto in streamed:
            names = [n for n, _ in encoders] + (["pixels"] if "pixels" in runner.views and proto != "linear" else [])
            for name in names:
                log(f"== {proto} on {name} (streamed)")
                if proto == "linear-fast" and name in sweeps:
                    recs = runner.linear_fast_sweep(name, sweeps[name], args.epochs or cfg.eval.probe_epochs, bs)
                    sweep_records += recs
                    got = [(f"{FAST_PROTOCOL} k={r['k'] or 'all'} t={r['t']}", name, r) for r in recs]
                elif proto == "linear-fast":
                    got = runner.linear_fast(name, args.epochs or cfg.eval.probe_epochs, bs)
                elif proto == "knn":
                    got = runner.knn(name, ks)
                else:
                    got = runner.linear(name, args.epochs or 90, bs, blr)
                for label, enc, res in got:
                    extra = {k: res[k] for k in ("lr", "blr", "batch_size", "T", "heldout_top1", "steps",
                                                 "micro_batch", "ranks", "resumed_from") if k in res}
                    rows.append(_row(label, enc, res, **extra))
                    log(f"{label} / {enc}: top-1 {res['top1']:.2f} top-5 {res['top5']:.2f}")
            continue
        for name, enc in encoders + (floors if proto in ("linear-fast", "knn") else []):
            log(f"== {proto} on {name} encoder")
            if proto == "linear-fast":
                ftr, fva, tx = cached(name, enc)
                epochs = args.epochs or cfg.eval.probe_epochs
                res = train_head_cached(ftr, train[1], fva, val[1], num_classes=C, epochs=epochs,
                                        batch_size=bs, blr=blr, seed=args.seed, log=log,
                                        desc=f"linear-fast/{name}")
                res["seconds"] += tx
                rows.append(_row(FAST_PROTOCOL, name, res, lr=res["lr"], batch_size=res["batch_size"]))
            elif proto == "knn":
                from .knn import knn_classify

                ftr, fva, tx = cached(name, enc)
                t0 = time.perf_counter()
                out_k = knn_classify(ftr, train[1], fva, val[1], ks=ks, num_classes=C, log=log)
                dt = time.perf_counter() - t0 + tx
                for k, r in out_k.items():
                    label = f"knn k={r['k_used']}" + ("" if r["k_used"] == k else f" (asked {k})")
                    rows.append(_row(label, name, dict(r, epochs=None, seconds=dt,
                                                       feature_dim=int(ftr.shape[1])), T=0.07))
            elif proto == "linear":
                from .linear_probe import linear_probe

                res = linear_probe(views[name], train, val, epochs=args.epochs or 90, batch_size=bs, blr=blr,
                                   pool=args.pool, seed=args.seed, num_classes=C, log=log,
                                   desc=f"linear/{name}")
                rows.append(_row(FULL_PROTOCOL, name, res, lr=res["lr"], batch_size=res["batch_size"]))
            elif proto == "finetune":
                from .finetune import finetune

                recipe, source = _finetune_recipe(cfg, args, method, enc, log)
                res = finetune(enc, train, val, recipe, num_classes=C, log=log, desc=f"finetune/{name}")
                rows.extend(_finetune_result_rows(name, res, recipe, source))
            log(f"{rows[-1]['protocol']} / {name}: top-1 {rows[-1]['top1']:.2f} "
                f"top-5 {rows[-1]['top5']:.2f}")

    # Each checkpoint row directly above its floors, protocols in the order asked.
    order = {p: i for i, p in enumerate(dict.fromkeys(r["protocol"] for r in rows))}
    rows.sort(key=lambda r: order[r["protocol"]])
    if runner is not None:
        C = C or runner.num_classes()
    # `--protocols figure` alone reads neither split.
    n_train = (int(train[0].shape[0]) if train is not None
               else runner.counts["train"] if runner is not None else 0)
    n_val = int(val[0].shape[0]) if val is not None else runner.counts["val"] if runner is not None else 0
    if not ranks.main:
        edist.barrier()
        return dict(rows=rows, out=str(out), figure=None, meta={})

    out.mkdir(parents=True, exist_ok=True)
    figure_path = None
    if "figure" in protocols:
        fig_imgs = (val[0] if val is not None
                    else build_eval_arrays(cfg, "val", args.figure_images)[0])[:args.figure_images]
        figure_path = _figure(cfg, model, method, fig_imgs, out, device, args.seed, log)

    table = markdown_table(rows)
    weights = ("an exported encoder" if method is None else
               "EMA" if cfg.optim.ema_decay > 0 and not (cfg.engine.backend == "deepspeed" and cfg.engine.zero_stage == 3)
               else "trained (the run kept no EMA)")
    meta = dict(checkpoint=str(args.checkpoint), data=data_desc, train_images=n_train,
                val_images=n_val, num_classes=C, img_size=cfg.data.img_size,
                pool=args.pool, device=str(device), weights=weights, features=feature_settings(device),
                seed=args.seed, torch=torch.__version__, ranks=ranks.world_size,
                streamed=streamed,
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                command="ldae-fast eval " + " ".join(getattr(args, "argv", [])))
    notes = [f"checkpoint `{args.checkpoint}`, data {data_desc}: {meta['train_images']} train / "
             f"{meta['val_images']} val images, {C} classes, {cfg.data.img_size}px, "
             f"{args.pool} pooling, device {device}, {meta['date']}"
             + (f", {ranks.world_size} ranks" if ranks.distributed else "") + ".",
             "'random init' rows: the same architecture with random weights (the floor)."]
    pixel_view = (runner.views["pixels"] if runner is not None and "pixels" in runner.views
                  else floors[0][1] if floors else None)
    if pixel_view is not None:
        notes.append(f"'pixels' rows: the resized image average-pooled to "
                     f"{pixel_view.side}px as the feature (and its PCA at the checkpoint's "
                     "feature width), under the same protocol: the floor a learned feature must beat.")
    notes.append(f"'{FAST_PROTOCOL}': head trained (seed {args.seed}) on features of un-augmented images "
                 "extracted once, not the full augmented protocol; times include feature extraction."
                 + (" Streamed: one head per base lr, the lr chosen on a held-out part of train."
                    if "linear-fast" in streamed else ""))
    notes.append(f"Weights: {weights}; {feature_settings(device)}. "
                 + ("train.py's demo epilogue probes in memory at the one eval.probe_blr, so its number "
                    "differs from this streamed one. " if "linear-fast" in streamed else
                    "train.py's demo epilogue probes the same way (seed 0, device auto), so on one machine "
                    "it prints the same probe number. ")
                 + "The demo's kNN centres the features on the train mean first; kNN rows here without a "
                   "suffix use the raw features.")
    if "knn" in streamed:
        notes.append("kNN rows on raw features (the usual protocol) carry no suffix; 'centred rows' "
                     "remove the train mean, 'whitened rows' also scale every train PCA direction to "
                     "unit variance, 'pca N rows' keep the top N; all L2-normalised.")
    if figure_path:
        notes.append(f"Figure: {figure_path}")
    parts = [f"# Evaluation of {args.checkpoint}", "\n".join(notes), table]
    sweep = {}
    if sweep_records:
        from .sweep import sweep_report

        sweep = sweep_report(sweep_records, cfg)
        parts += ["## Probe sweep over depth k and noise step t", sweep["markdown"]]
        (out / "sweep.md").write_text(f"# Probe sweep of {args.checkpoint}\n\n{sweep['markdown']}\n")
        print(sweep["markdown"], flush=True)
    md = "\n\n".join(parts) + "\n"
    (out / "eval.md").write_text(md)
    (out / "eval.json").write_text(json.dumps(dict(meta, rows=rows, figure=str(figure_path or ""),
                                                   sweep=sweep.get("json", []), config=cfg.to_dict()),
                                              indent=2) + "\n")
    print(table, flush=True)
    log(f"wrote {out / 'eval.md'} and {out / 'eval.json'}")
    edist.barrier()
    return dict(rows=rows, out=str(out), figure=str(figure_path) if figure_path else None, meta=meta)


STREAMED = ("linear-fast", "knn", "linear", "finetune")


def _finetune_recipe(cfg, args, method, enc, log):
    """(recipe, where it comes from): the checkpoint's method's, with the --finetune-* flags."""
    from .finetune_run import recipe_of

    over = dict(seed=args.seed, pool=args.pool, max_steps=args.finetune_steps,
                num_workers=(cfg.data.num_workers if args.num_workers is None else args.num_workers))
    if args.finetune_epochs or args.epochs:
        over["epochs"] = args.finetune_epochs or args.epochs
    if args.finetune_batch_size:
        over["batch_size"] = args.finetune_batch_size
    if args.finetune_head_init == "printed":
        from ldae_fast.config import HEAD_INIT_STD_AS_PRINTED
        over["head_init_std"] = HEAD_INIT_STD_AS_PRINTED
    method_name = method.name if method is not None else "(exported encoder)"
    recipe, source = recipe_of(cfg, method_name, enc, over)
    log(f"finetune recipe: {source}; batch {recipe.batch_size}, blr {recipe.blr:g}, layer decay "
        f"{recipe.layer_decay}, drop path {recipe.drop_path}, dropout {recipe.dropout}, repeated aug "
        f"{recipe.repeated_aug}, head init std {recipe.head_init_std:g}")
    return recipe, source


def _finetune_result_rows(name: str, res: dict, recipe, source: str) -> list[dict]:
    extra = dict(steps=res["steps"], lr=res["lr"], batch_size=res["batch_size"], last_loss=res["last_loss"],
                 layer_decay=res["layer_decay"], recipe=source, head_init_std=recipe.head_init_std)
    extra.update({k: res[k] for k in ("micro_batch", "ranks", "accumulation", "resumed_from") if k in res})
    rows = [_row("finetune", name, res, **extra)]
    if "ema_top1" in res:
        rows.append(_row(f"finetune (EMA {res['ema_decay']:g})", name,
                         dict(res, top1=res["ema_top1"], top5=res["ema_top5"]), **extra))
    return rows


def _finetune_rows(cfg, args, runner, name, enc, method, out: Path, device, log) -> list[dict]:
    """Fine-tune one encoder on the shards (eval/finetune_run.py); its row and its EMA row."""
    from .finetune_run import FinetuneArgs, finetune_streamed

    recipe, source = _finetune_recipe(cfg, args, method, enc, log)
    if args.micro_batch < 1 or args.finetune_ckpt_every < 1:
        raise EvalError("--micro-batch and --finetune-ckpt-every must be >= 1")
    n_train = runner.num_train()
    fa = FinetuneArgs(out_dir=Path(args.finetune_dir) if args.finetune_dir else out / "finetune",
                      readers=args.readers, micro_batch=args.micro_batch, num_workers=recipe.num_workers,
                      ckpt_every=args.finetune_ckpt_every, seed=args.seed, max_train=args.max_train_images,
                      max_val=args.max_val_images)
    res = finetune_streamed(cfg, name, enc, recipe, fa, num_classes=runner.num_classes(), num_train=n_train,
                            device=device, log=log)
    runner.counts["train"] = runner.counts["train"] or n_train
    runner.counts["val"] = runner.counts["val"] or res["val_images"]
    rows = _finetune_result_rows(name, res, recipe, source)
    for r in rows:
        log(f"{r['protocol']} / {name}: top-1 {r['top1']:.2f} top-5 {r['top5']:.2f}")
    return rows


def _quiet(msg: str) -> None:
    pass


def _rank_device(name: str):
    """--device (a torch.device), with 'auto' and 'cuda' meaning this rank's GPU (LOCAL_RANK) under
    torchrun."""
    import os

    import torch

    from ldae_fast.device import resolve_device

    dev = resolve_device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev


def _streaming_runner(cfg, args, views, out: Path, device, log):
    from .scale import ScaleArgs, StreamingEval
    from .sweep import probe_key as sweep_probe_key

    try:
        blrs = tuple(float(b) for b in args.blrs.split(",") if b.strip()) if args.blrs else None
    except ValueError:
        raise EvalError(f"--blrs {args.blrs!r}: comma-separated numbers") from None
    if blrs is None:
        blrs = (args.blr,) if args.blr else (0.01, 0.03, 0.1, 0.3, 1.0)
    kinds = tuple(k.strip() for k in args.knn_rows.split(",") if k.strip())
    from .rows import ROW_KINDS

    if not kinds or any(k not in ROW_KINDS for k in kinds):
        raise EvalError(f"--knn-rows {args.knn_rows!r}: choose from {', '.join(ROW_KINDS)}")
    from ldae_fast.data.urls import expand_urls

    from . import dist as edist
    from .stream import default_readers

    workers = cfg.data.num_workers if args.num_workers is None else args.num_workers
    # Capped splits are read sample by sample, where the shard count does not matter.
    n_shards = 0 if args.max_train_images else len(expand_urls(cfg.data.train_shards, "data.train_shards"))
    readers = args.readers or default_readers(edist.current().world_size, workers, n_shards,
                                              at_most=args.batch_size or cfg.eval.probe_batch_size)
    if readers < 1 or args.micro_batch < 1:
        raise EvalError("--readers and --micro-batch must be >= 1")
    if not 0 <= args.holdout < 1:
        raise EvalError(f"--holdout {args.holdout}: a fraction in [0, 1)")
    sa = ScaleArgs(readers=readers, num_workers=workers,
                   micro_batch=args.micro_batch,
                   store_root=Path(args.feature_store) if args.feature_store else out / "features",
                   store_dtype=args.store_dtype, blrs=blrs, holdout=args.holdout, knn_rows=kinds,
                   probe_dir=Path(args.probe_dir) if args.probe_dir else out / "probe",
                   ckpt_every=args.probe_ckpt_every)
    probe_key = sweep_probe_key(cfg)
    return StreamingEval(cfg, dict(views), probe_key, sa, pool=args.pool, seed=args.seed, device=device,
                         max_train=args.max_train_images, max_val=args.max_val_images, log=log)


def _figure(cfg, model, method, images, out, device, seed, log) -> Optional[Path]:
    """The checkpoint's method draws its own figure (MethodSpec.figure)."""
    from ..methods import spec_for

    if method is None:
        log("figure: skipped (the checkpoint holds an encoder only; the figure needs the decoder "
            "and the tokenizer)")
        return None
    model.to(device)
    p, caption = spec_for(cfg).figure(cfg, model, method, out, images=images, step=seed)
    log(f"figure ({caption}): {p}")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    return command_main(argv, "eval", build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
