#!/usr/bin/env python
"""Does pretraining learn? l-DAE on resident Tiny ImageNet for a wall-clock budget, then kNN and
the fast linear probe for the pretrained encoder and random-init encoders of the same shape.

    python bench/learn_check.py --data-dir DIR --train-shards N --val-shards M --budget-s S \\
        --out FILE.json [--toy] [--device auto]
    python bench/learn_check.py --eval-only RUN_DIR --from FILE.json --out NEW.json [--data-dir DIR]

DIR holds train-*.tar.gz and val-*.tar.gz (the Tiny ImageNet WebDataset layout); the first N
train and M val shards in name order are used (and named in the output). Steps:
1. decode the shards once into the resident cache (data.source=resident);
2. calibrate: a short run of the same configuration measures images/s, so the main run's step
   count (and so its cosine schedule) fits the budget; engine.time_budget_s stops it in any case;
3. pretrain through the normal engine (`ldae_fast.engine.loop.train`);
4. evaluate the EMA encoder and `--floor-seeds` random-init encoders (seeds 0.. ; seed 0 is the
   pretrained run's own initialisation): features of the un-augmented train and val images
   (mean of patch tokens), a weighted kNN whose k is chosen on a held-out fifth of the train
   images (on features centred on the train mean, `knn_top1`; as they are, `knn_raw_top1`; and
   whitened, `knn_whitened_top1`: eval/rows.py's map, fitted on the train features only),
   and the fast linear probe (cached features, LARS) whose base lr is chosen the same
   way and then refit on all train images. Val images are used for the reported numbers only.
FILE.json is rewritten after every stage, so a killed run keeps what it measured; the table is
printed as markdown at the end.

--eval-only RUN_DIR --from FILE.json repeats step 4 alone on a finished run: RUN_DIR is its
--run-dir (the last checkpoint under RUN_DIR/pretrain, its EMA weights as the run used), FILE.json
its output, whose recorded command sets the evaluation (setup, classes, probe epochs, floors,
pixel floor) and whose meta and stages are copied into NEW.json; the rows are measured anew (a
field the evaluation gained since, such as the whitened kNN, is then filled in). RUN_DIR is only read.

Configurations: on a GPU, ViT-S (12 + 12 blocks, width 384) at 64 px, patch 8, d = 32, batch
256 (the `tiny-imagenet` preset's model); `--toy`: the `tiny` model at 16 px on 10 classes of
the given shards (a few hundred images), a CPU rehearsal of every stage in well under a minute.
The flags after --device override either (the CPU study in docs/results.md uses them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Runnable as `python bench/learn_check.py` from a checkout without installing the package.
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import results_io  # noqa: E402
import torch  # noqa: E402

GPU_SETUP = {"model": "S", "img_size": 64, "patch_size": 8, "latent_dim": 32, "batch_size": 256,
             "blr": 4e-4, "classes": 0, "probe_epochs": 30, "calib_steps": 40}
TOY_SETUP = {"model": "tiny", "img_size": 16, "patch_size": 4, "latent_dim": 16, "batch_size": 32,
             "blr": 4e-3, "classes": 10, "probe_epochs": 30, "calib_steps": 6}
KNN_KS = (5, 10, 20, 50, 100, 200)
PROBE_BLRS = (1.0, 10.0, 100.0, 1000.0)


class UsageError(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="folder with train-*.tar.gz and val-*.tar.gz")
    p.add_argument("--train-shards", type=int, help="how many train shards to use")
    p.add_argument("--val-shards", type=int, help="how many val shards to use")
    p.add_argument("--budget-s", type=float, help="wall-clock seconds of pretraining")
    p.add_argument("--out", required=True, help="JSON file, rewritten as the run goes")
    p.add_argument("--toy", action="store_true", help="tiny model, 16 px, 10 classes: CPU rehearsal")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    # Overrides of the chosen setup.
    p.add_argument("--model", help="model size (tiny, S, B, ...)")
    p.add_argument("--width", type=int, default=0, help="model width (0: from --model)")
    p.add_argument("--depth", type=int, default=0, help="encoder and decoder depth (0: from --model)")
    p.add_argument("--heads", type=int, default=0, help="attention heads (0: from --model)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--latent-dim", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--blr", type=float, help="pretraining base lr (lr = blr * batch / 256)")
    p.add_argument("--classes", type=int, help="pretrain and evaluate on classes 0..K-1 only (0: all)")
    p.add_argument("--eval-classes", type=int, default=0,
                   help="evaluate on classes 0..K-1 only, pretrain on all of --classes (0: the same)")
    p.add_argument("--crop-min-scale", type=float, default=0.35)
    p.add_argument("--steps", type=int, default=0, help="pretraining steps (0: calibrated to the budget)")
    p.add_argument("--warmup-frac", type=float, default=0.05, help="warm-up as a fraction of the steps")
    p.add_argument("--probe-epochs", type=int)
    p.add_argument("--floor-seeds", type=int, default=3, help="random-init encoders (seeds 0..n-1)")
    p.add_argument("--seed", type=int, default=0, help="pretraining seed")
    p.add_argument("--pixel-floor", action="store_true",
                   help="also score the raw pixels (normalised, flattened) with the same kNN and probe")
    p.add_argument("--curve-every", type=int, default=0,
                   help="also checkpoint every N steps and evaluate each checkpoint's encoder (rows "
                        "'pretrained@step'): the probe / kNN against images seen (bench/plot_curve.py)")
    p.add_argument("--cache-dir", default="", help="resident cache (default: data.cache_dir's)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default); on a shared, loaded CPU one "
                        "thread can be several times faster than two (OpenMP spin-waits)")
    p.add_argument("--run-dir", default="", help="engine out_dir (default: a temporary folder)")
    p.add_argument("--eval-only", default="", metavar="RUN_DIR",
                   help="pretrain nothing: evaluate the last checkpoint under RUN_DIR/pretrain (a finished "
                        "run's --run-dir) as that run did; needs --from")
    p.add_argument("--from", dest="from_json", default="", metavar="FILE.json",
                   help="with --eval-only: the run's own output, whose recorded flags set the evaluation and "
                        "whose pretraining stages are copied; --data-dir, --device, --threads, --cache-dir "
                        "given here override its")
    return p.parse_args(argv)


def pick_shards(data_dir: Path, n_train: int, n_val: int) -> tuple[list[str], list[str]]:
    if not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir}: no such folder")
    out = []
    for kind, n in (("train", n_train), ("val", n_val)):
        have = sorted(str(p) for p in data_dir.glob(f"{kind}-*.tar.gz"))
        if n < 1 or len(have) < n:
            raise UsageError(f"--{kind}-shards {n}: {data_dir} holds {len(have)} {kind}-*.tar.gz shard(s); "
                             f"give 1..{len(have)}")
        out.append(have[:n])
    return out[0], out[1]


def setup_of(args: argparse.Namespace) -> dict[str, Any]:
    s = dict(TOY_SETUP if args.toy else GPU_SETUP)
    for k in ("model", "img_size", "patch_size", "latent_dim", "batch_size", "blr", "classes", "probe_epochs"):
        v = getattr(args, k)
        if v is not None:
            s[k] = v
    s.update(width=args.width, depth=args.depth, heads=args.heads, crop_min_scale=args.crop_min_scale)
    return s


def make_config(setup: dict[str, Any], train: list[str], val: list[str], device: str, cache_dir: str,
                run_dir: str, epoch_size: int, steps: int, budget_s: float, seed: int, warmup_frac: float,
                curve_every: int = 0):
    import ldae_fast.methods  # noqa: F401 (registers the methods' config sections and presets)
    from ldae_fast.config import build_config

    o: dict[str, Any] = {
        "model.size": setup["model"], "model.patch_size": setup["patch_size"],
        "data.img_size": setup["img_size"], "tokenizer.latent_dim": setup["latent_dim"],
        "data.source": "resident", "data.train_shards": "::".join(train), "data.val_shards": "::".join(val),
        "data.epoch_size": epoch_size, "data.batch_size": setup["batch_size"],
        "data.class_subset": setup["classes"], "data.crop_min_scale": setup["crop_min_scale"],
        "data.cache_dir": cache_dir, "tokenizer.fit_images": min(4096, epoch_size),
        "optim.blr": setup["blr"], "optim.clip_grad": 3.0, "engine.device": device,
        "engine.steps": steps, "engine.time_budget_s": budget_s, "engine.seed": seed,
        "engine.log_every": max(1, min(50, steps // 10)), "engine.ckpt_every": 0, "engine.keep_last": 1,
        "engine.out_dir": run_dir, "engine.progress": False, "eval.probe": False, "eval.figure": False,
    }
    if curve_every:
        # Every checkpoint stays: each is one point of the curve.
        o["engine.ckpt_every"], o["engine.keep_last"] = curve_every, max(1, steps // curve_every + 1)
    steps_per_epoch = max(1, epoch_size // setup["batch_size"])
    o["optim.warmup_epochs"] = max(warmup_frac * steps, 1) / steps_per_epoch
    for k, key in (("width", "model.width"), ("heads", "model.num_heads")):
        if setup[k]:
            o[key] = setup[k]
    if setup["depth"]:
        o["model.encoder_depth"] = o["model.decoder_depth"] = setup["depth"]
    return build_config("demo", {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in o.items()})


@torch.no_grad()
def features(encoder: torch.nn.Module, images_u8: torch.Tensor, device: torch.device, batch: int = 512) -> torch.Tensor:
    """Mean-pooled encoder features of uint8 images, normalised on the device a batch at a time."""
    from ldae_fast.data import normalize
    from ldae_fast.device import autocast_for, eval_mode
    from ldae_fast.eval.features import pool_features

    out = []
    with eval_mode(encoder):
        for chunk in images_u8.split(batch):
            with autocast_for(device):
                out.append(pool_features(encoder, normalize(chunk.to(device)), "avg").float())
    return torch.cat(out)


def holdout_split(n: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, n // 5)
    return perm[cut:], perm[:cut]


def evaluate(encoder: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor],
             val: tuple[torch.Tensor, torch.Tensor], device: torch.device, probe_epochs: int,
             num_classes: int) -> dict[str, Any]:
    """kNN and fast linear probe; k and the probe lr are chosen on a held-out fifth of train."""
    t0 = time.time()
    ftr, fva = features(encoder, train[0], device), features(encoder, val[0], device)
    return evaluate_features(ftr, fva, train[1], val[1], device, probe_epochs, num_classes, t0)


def pixel_features(images_u8: torch.Tensor, device: torch.device, batch: int = 512) -> torch.Tensor:
    """The raw-pixel floor's features: each image normalised as the encoders see it, flattened."""
    from ldae_fast.data import normalize

    return torch.cat([normalize(c.to(device)).float().flatten(1) for c in images_u8.split(batch)])


def evaluate_features(ftr: torch.Tensor, fva: torch.Tensor, ytr: torch.Tensor, yva: torch.Tensor,
                      device: torch.device, probe_epochs: int, num_classes: int, t0: float) -> dict[str, Any]:
    """evaluate's protocol on features already extracted."""
    from ldae_fast.eval.knn import knn_classify
    from ldae_fast.eval.linear_probe import train_head_cached
    from ldae_fast.eval.rows import fit_tensor

    ytr, yva = ytr.to(device), yva.to(device)
    fit, held = (i.to(device) for i in holdout_split(len(ytr)))
    ks = [k for k in KNN_KS if k <= len(fit)] or [len(fit)]

    def knn(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
        sel = knn_classify(a[fit], ytr[fit], a[held], ytr[held], ks=ks, num_classes=num_classes)
        k = max(ks, key=lambda kk: (sel[kk]["top1"], -kk))
        return k, knn_classify(a, ytr, b, yva, ks=[k], num_classes=num_classes)[k]["top1"]

    k_raw, knn_raw = knn(ftr, fva)
    # Centred on the train mean: random-init features share a large common direction that
    # dominates the cosine similarity; removing it (a train-only statistic) is fair to both.
    mu = ftr.mean(0, keepdim=True)
    k, knn_top1 = knn(ftr - mu, fva - mu)
    # Whitened (eval/rows.py, fitted on all train rows, never val): a few directions (colour,
    # brightness) carry most of the variance of mean-pooled features and drown the rest.
    white = fit_tensor(ftr, "whitened")
    k_white, knn_white = knn(white(ftr), white(fva))

    def probe(blr: float, a, ya, b, yb) -> float:
        return train_head_cached(a, ya, b, yb, num_classes=num_classes, epochs=probe_epochs,
                                 batch_size=256, blr=blr, seed=0)["top1"]

    scores = {}
    for b in PROBE_BLRS:
        try:
            scores[b] = probe(b, ftr[fit], ytr[fit], ftr[held], ytr[held])
        except FloatingPointError:  # this lr diverged on these features: not a candidate
            scores[b] = -1.0
    top1, blr = math.nan, math.nan
    for b in sorted(PROBE_BLRS, key=lambda b: (-scores[b], b)):
        if scores[b] < 0:
            break
        try:
            top1, blr = probe(b, ftr, ytr, fva, yva), b
            break
        except FloatingPointError:
            continue
    return {"knn_k": k, "knn_top1": round(knn_top1, 2), "knn_raw_k": k_raw, "knn_raw_top1": round(knn_raw, 2),
            "knn_whitened_k": k_white, "knn_whitened_top1": round(knn_white, 2),
            "probe_blr": blr, "probe_top1": round(top1, 2),
            "eval_s": round(time.time() - t0, 1)}


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    cols = ["encoder", "seed", "knn_top1", "knn_k", "knn_raw_top1", "knn_raw_k", "knn_whitened_top1",
            "knn_whitened_k", "probe_top1", "probe_blr", "images_seen", "steps", "train_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    if summary:
        lines.append("")
        lines.append(f"random-init floor over {summary['floor_seeds']} seeds: kNN {summary['floor_knn_mean']:.2f} "
                     f"± {summary['floor_knn_std']:.2f}, whitened kNN {summary['floor_knn_whitened_mean']:.2f} ± "
                     f"{summary['floor_knn_whitened_std']:.2f}, probe {summary['floor_probe_mean']:.2f} ± "
                     f"{summary['floor_probe_std']:.2f} (mean ± std); pretrained − floor mean: kNN "
                     f"{summary['knn_margin']:+.2f}, whitened kNN {summary['knn_whitened_margin']:+.2f}, probe "
                     f"{summary['probe_margin']:+.2f} points; chance {summary['chance']:.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ldae_fast.errors import UserError, one_line

    args = parse_args(argv)
    try:
        return run(args, argv)
    except UsageError as e:
        print(f"learn_check: {e}", file=sys.stderr)
        return 2
    except UserError as e:  # a damaged checkpoint or data file (--eval-only): its documented code
        print(f"learn_check: {e.category}: {one_line(e)}", file=sys.stderr)
        return e.exit_code


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    from ldae_fast.engine.loop import train
    from ldae_fast.methods import build_model

    if args.eval_only:
        return run_eval_only(args, argv)
    for flag in ("data_dir", "train_shards", "val_shards", "budget_s"):
        if getattr(args, flag) is None:
            raise UsageError(f"--{flag.replace('_', '-')} is required (unless --eval-only)")
    if args.budget_s <= 0:
        raise UsageError(f"--budget-s {args.budget_s}: must be > 0")
    ctx = Context(args, argv)
    ctx.doc["meta"]["budget_s"] = args.budget_s
    ctx.save()
    setup, n_train = ctx.setup, ctx.n_train

    steps = args.steps
    if not steps:
        calib = setup["calib_steps"]
        res = train(ctx.cfg_with(n_train, calib, args.budget_s, "calibrate"), log_enabled=False)
        # The last log window excludes the first steps (kernel compilation, allocator warm-up).
        ips = res.images_per_s
        steps = max(1, int(0.97 * args.budget_s * ips / setup["batch_size"]))
        ctx.stage("calibrate", steps=res.steps, images_per_s=round(ips, 1), planned_steps=steps)
    cfg = ctx.cfg_with(n_train, steps, args.budget_s, "pretrain", args.curve_every)
    t1 = time.time()
    res = train(cfg)
    train_s = time.time() - t1
    images_seen = res.steps * cfg.data.batch_size
    ctx.stage("pretrain", steps=res.steps, planned_steps=steps, images_seen=images_seen,
              train_s=round(train_s, 1), final_loss=round(res.final_loss, 4), epochs=round(images_seen / n_train, 2))

    enc = build_model(cfg)
    src = res.ema if res.ema is not None else res.model
    enc.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
    return evaluate_run(ctx, cfg, enc, res.steps, train_s, Path(cfg.engine.out_dir))


class Context:
    """What a run and an eval-only run share: the settings, the output document, the resident
    train and val images."""

    def __init__(self, args: argparse.Namespace, argv: list[str] | None, meta: dict[str, Any] | None = None) -> None:
        from ldae_fast.data.resident import keep_classes, resident_arrays
        from ldae_fast.device import resolve_device

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        self.args = args
        self.device = resolve_device(args.device, "--device", UsageError)
        self.train_urls, self.val_urls = pick_shards(Path(args.data_dir), args.train_shards, args.val_shards)
        self.setup = setup_of(args)
        self.out = Path(args.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        env = results_io.environment()
        cmd = results_io.command_line(None if argv is None else [os.path.abspath(__file__), *argv])
        self.stamp = {"device": env.get("gpu") or f"cpu ({os.cpu_count()} cores visible, {torch.get_num_threads()} "
                      "threads)", "torch": env.get("torch"), "triton": env.get("triton"), "date": env["date"],
                      "command": cmd}
        self.doc: dict[str, Any] = {"meta": meta if meta is not None else {
            **env, **self.stamp, "setup": self.setup, "train_shards": [Path(u).name for u in self.train_urls],
            "val_shards": [Path(u).name for u in self.val_urls]}, "stages": {}, "rows": [], "summary": {}}
        self.run_root = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="learn_check-"))
        self.t0 = time.time()
        probe_cfg = self.cfg_with(1, 1, 0.0, "probe")
        self.tr = resident_arrays(probe_cfg, "train")
        self.va = resident_arrays(probe_cfg, "val")
        self.n_train = len(self.tr[1])
        if args.eval_classes:
            self.tr = keep_classes(*self.tr, args.eval_classes)
            self.va = keep_classes(*self.va, args.eval_classes)
        self.num_classes = int(max(int(self.tr[1].max()), int(self.va[1].max()))) + 1
        self.data_stage = dict(pretrain_images=self.n_train, train_images=len(self.tr[1]),
                               val_images=len(self.va[1]), classes=self.num_classes, img_size=self.setup["img_size"],
                               seconds=round(time.time() - self.t0, 1))
        if meta is None:
            self.stage("data", **self.data_stage)
        if self.n_train < self.setup["batch_size"]:
            raise UsageError(f"{self.n_train} train images are fewer than one batch of {self.setup['batch_size']}")

    def cfg_with(self, epoch_size: int, steps: int, budget: float, sub: str, curve_every: int = 0):
        a = self.args
        try:
            return make_config(self.setup, self.train_urls, self.val_urls, a.device, a.cache_dir,
                               str(self.run_root / sub), epoch_size, steps, budget, a.seed, a.warmup_frac,
                               curve_every)
        except ValueError as e:  # ConfigError: a bad override
            raise UsageError(str(e)) from None

    def save(self) -> None:
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1) + "\n")
        os.replace(tmp, self.out)

    def stage(self, name: str, **info: Any) -> None:
        self.doc["stages"][name] = info
        self.save()
        print(f"[learn_check] {name}: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)


def run_eval_only(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Evaluate a finished run's last checkpoint as the run itself did (its recorded flags), and
    write the run's JSON shape: its meta and stages copied, the rows measured now."""
    import shlex

    from ldae_fast.eval.reader import load_for_eval

    if not args.from_json:
        raise UsageError("--eval-only needs --from FILE.json (the run's own output)")
    try:
        orig = json.loads(Path(args.from_json).read_text())
        words = shlex.split(orig["meta"]["command"])
        stages = orig["stages"]
        pre = stages["pretrain"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--from {args.from_json}: not a finished learn_check JSON ({e!r})") from None
    script = next((i for i, w in enumerate(words) if w.endswith("learn_check.py")), None)
    if script is None:
        raise UsageError(f"--from {args.from_json}: its meta.command does not run learn_check.py")
    # The recorded flags are parsed, never run: they set the same setup, classes, probe and floors.
    a = parse_args(words[script + 1:])
    for flag in ("data_dir", "cache_dir"):
        if getattr(args, flag):
            setattr(a, flag, getattr(args, flag))
    a.device = args.device if args.device != "auto" else a.device
    a.threads = args.threads or a.threads
    a.out, a.eval_only, a.from_json, a.run_dir = args.out, args.eval_only, args.from_json, ""
    ckpt_dir = Path(args.eval_only) / "pretrain"
    if not (ckpt_dir / "checkpoints").is_dir():
        raise UsageError(f"--eval-only {args.eval_only}: no pretrain/checkpoints/ in it (a learn_check --run-dir)")
    meta = dict(orig["meta"])
    ctx = Context(a, None, meta)  # a.run_dir is '': nothing is written in RUN_DIR
    for key in ("train_shards", "val_shards"):
        now = [Path(u).name for u in (ctx.train_urls if key == "train_shards" else ctx.val_urls)]
        if meta.get(key) != now:
            raise UsageError(f"--data-dir {a.data_dir}: its {key} {now} are not the run's {meta.get(key)}")
    if stages.get("data", {}).get("train_images") not in (None, ctx.data_stage["train_images"]):
        raise UsageError(f"--data-dir {a.data_dir}: {ctx.data_stage['train_images']} eval train images, the run "
                         f"had {stages['data']['train_images']}")
    cmd = results_io.command_line(None if argv is None else [os.path.abspath(__file__), *argv])
    meta["eval_only"] = {**ctx.stamp, "command": cmd, "run_dir": str(args.eval_only), "from": str(args.from_json)}
    ctx.doc["stages"] = dict(stages)
    cfg, model, _ = load_for_eval(ckpt_dir, flag="--eval-only")  # the EMA weights when kept, as the run used
    if getattr(model, "encoder", None) is None:
        raise UsageError(f"--eval-only {args.eval_only}: the checkpoint holds no encoder")
    ctx.save()
    return evaluate_run(ctx, cfg, model.float(), int(pre["steps"]), float(pre["train_s"]), ckpt_dir)


def evaluate_run(ctx: Context, cfg, enc: torch.nn.Module, steps: int, train_s: float, ckpt_dir: Path) -> int:
    """Evaluate the pretrained model `enc`, the random-init floors, the pixel floor and the curve's
    checkpoints (under `ckpt_dir`); write the rows, the summary and the table."""
    from ldae_fast.methods import build_model

    args, device, setup, num_classes = ctx.args, ctx.device, ctx.setup, ctx.num_classes
    tr, va, doc = ctx.tr, ctx.va, ctx.doc
    images_seen = steps * cfg.data.batch_size
    encoders = [("pretrained", args.seed, enc.encoder)]
    for s in range(args.floor_seeds):
        torch.manual_seed(s)
        encoders.append(("random-init", s, build_model(cfg).encoder))
    common = {"model": f"{cfg.model.size} w{cfg.model.width} d{cfg.model.encoder_depth}+{cfg.model.decoder_depth}",
              "img_size": cfg.data.img_size, "patch_size": cfg.model.patch_size, "pretrain_images": ctx.n_train,
              "train_images": len(tr[1]),
              "val_images": len(va[1]), "classes": num_classes, **ctx.stamp}
    for name, seed, e in encoders:
        e = e.to(device)
        r = evaluate(e, tr, va, device, setup["probe_epochs"], num_classes)
        pre = name == "pretrained"
        doc["rows"].append({"encoder": name, "seed": seed, **r,
                            "images_seen": images_seen if pre else 0, "steps": steps if pre else 0,
                            "train_s": round(train_s, 1) if pre else 0, **common})
        e.cpu()
        ctx.save()
        print(f"[learn_check] {name} seed {seed}: kNN top-1 {r['knn_top1']} (k={r['knn_k']}), whitened "
              f"{r['knn_whitened_top1']}, probe top-1 {r['probe_top1']} (blr {r['probe_blr']})", flush=True)
    if args.pixel_floor:
        t2 = time.time()
        r = evaluate_features(pixel_features(tr[0], device), pixel_features(va[0], device), tr[1], va[1], device,
                              setup["probe_epochs"], num_classes, t2)
        doc["rows"].append({"encoder": "raw pixels", "seed": "-", **r, "images_seen": 0, "steps": 0,
                            "train_s": 0, **common})
        ctx.save()
        print(f"[learn_check] raw pixels: kNN top-1 {r['knn_top1']} (k={r['knn_k']}), whitened "
              f"{r['knn_whitened_top1']}, probe top-1 {r['probe_top1']} (blr {r['probe_blr']})", flush=True)
    if args.curve_every:
        from ldae_fast.engine.checkpoint import list_checkpoints
        from ldae_fast.eval.reader import load_for_eval

        for ck in list_checkpoints(ckpt_dir):
            _, m, _ = load_for_eval(ck)  # the EMA weights when the run kept them, as above
            step = int(ck.name.rpartition("_")[2])
            if step >= steps:
                continue  # the final encoder is the 'pretrained' row already
            e = m.encoder.float().to(device)
            r = evaluate(e, tr, va, device, setup["probe_epochs"], num_classes)
            doc["rows"].append({"encoder": "pretrained@step", "seed": args.seed, **r,
                                "images_seen": step * cfg.data.batch_size, "steps": step, "train_s": "-",
                                **common})
            e.cpu()
            ctx.save()
            print(f"[learn_check] step {step}: kNN top-1 {r['knn_top1']}, probe top-1 {r['probe_top1']}", flush=True)
    floor = [r for r in doc["rows"] if r["encoder"] == "random-init"]
    pre = doc["rows"][0]
    if floor:
        fk = [r["knn_top1"] for r in floor]
        fw = [r["knn_whitened_top1"] for r in floor]
        fp = [r["probe_top1"] for r in floor]

        def sd(xs: list[float]) -> float:
            return statistics.stdev(xs) if len(xs) > 1 else math.nan

        doc["summary"] = {
            "floor_seeds": len(floor), "floor_knn_mean": statistics.mean(fk), "floor_knn_std": sd(fk),
            "floor_knn_whitened_mean": statistics.mean(fw), "floor_knn_whitened_std": sd(fw),
            "floor_probe_mean": statistics.mean(fp), "floor_probe_std": sd(fp),
            "knn_margin": pre["knn_top1"] - statistics.mean(fk),
            "knn_whitened_margin": pre["knn_whitened_top1"] - statistics.mean(fw),
            "probe_margin": pre["probe_top1"] - statistics.mean(fp), "chance": 100.0 / num_classes,
            "total_s": round(time.time() - ctx.t0, 1)}
    doc["markdown"] = markdown(doc["rows"], doc["summary"])
    ctx.save()
    print(doc["markdown"])
    print(f"[learn_check] wrote {ctx.out} ({time.time() - ctx.t0:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
