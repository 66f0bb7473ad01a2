"""`python train.py [--preset NAME] [--section.field=value ...]`: pretrain, then show what was learned.

With no arguments this runs the `demo` preset on the built-in synthetic data: fit the patch PCA,
pretrain, write a checkpoint, the clean / noisy / denoised figure and a quick linear probe next to
the same probe on a randomly initialised encoder.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from . import methods  # noqa: F401 (registers the methods' config sections, names and presets)
from .config import Config, parse_cli
from .errors import UsageError, one_line, run_cli

USAGE = """usage: python train.py [--preset NAME] [--config FILE.json] [--section.field=value ...]
                       [--kernels auto|triton|reference] [--resume auto|PATH] [--out DIR] [--debug]
                       [--version]

presets: demo (default), tiny-imagenet, ldae-vitb, ldae-vithalfl, ldae-vitl,
         diffmae-demo, diffmae-vitb, diffmae-vitl, diffmae-vith, diffmae-video-demo,
         diffmae-video-vitl, diffmae-video-vitl14, mae-demo (and the l-DAE trajectory rows)
values: --section.field=value and --section.field value are the same; booleans also take
  --section.field (true) and --no-section.field (false). A preset sets some fields (shown as
  [demo: value] below; `--preset NAME --help` shows NAME's); --config FILE.json starts from a
  saved config.json instead.
errors: one line on stderr and an exit code per kind (README "Exit codes"); --debug or
  LDAE_DEBUG=1 adds the traceback
examples:
  python train.py                                   # the demo on the CPU (timings: README)
  python train.py --preset tiny-imagenet --engine.epochs=1
  deepspeed train.py --preset ldae-vitb --data.train_shards='/data/imagenet/train-{000000..001023}.tar'
"""


def usage(argv: list[str] = ()) -> str:
    """USAGE plus every config field; the [preset: value] marks follow a --preset in argv."""
    from .config import PRESETS, config_help

    preset = "demo"
    for i, a in enumerate(argv):
        if a.startswith("--preset="):
            preset = a.partition("=")[2]
        elif a == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
    preset = preset if preset in PRESETS else "demo"
    return f"{USAGE}\nfields (type, default, what it does):\n{config_help(preset)}\n"


PROBE_SEED = 0
"""The probe head's seed: `ldae-fast eval --seed`'s default, so both print one number."""


def finish_demo(cfg: Config, result, log=print) -> dict:
    """Figure, then the fast linear probe and a kNN (centred and whitened features) of the trained
    encoder against a random-init encoder of the same architecture (the floor), the raw pixels and
    chance; returns every number it printed (train.write_results stores them)."""
    import torch

    from .data import build_eval_arrays
    from .data.badsamples import DataError
    from .device import resolve_device
    from .eval.features import feature_settings, probe_encoder, probe_view
    from .eval.knn import knn_classify
    from .eval.linear_probe import train_head_cached
    from .eval.rows import fit_tensor
    from .methods import build_model, spec_for

    out = {}
    # A fresh fp32, uncompiled copy on the CPU: the trained module may hold bf16 parameters
    # (DeepSpeed's bf16 mode casts them) or compiled CUDA blocks. The EMA weights when there are
    # any: our inference from DiT's practice (the l-DAE paper builds on DiT, which samples from its
    # EMA); l-DAE's text does not say which weights it probes.
    model = build_model(cfg)
    src = result.ema if result.ema is not None else result.model
    model.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
    model = model.eval()
    if cfg.eval.figure:
        # The method's figure moves a twin of the method to where the CPU copy of the model is.
        path, caption = spec_for(cfg).figure(cfg, model, result.method, Path(cfg.engine.out_dir))
        log(f"figure ({caption}): {path}")
        out["figure"] = str(path)
    if cfg.eval.probe:
        t0 = time.time()
        try:
            train_arr = build_eval_arrays(cfg, "train")
            val_arr = build_eval_arrays(cfg, "val")
        except DataError as e:  # the user's own shards may carry no labels: pretraining needs none
            log(f"linear probe and kNN skipped: {one_line(e)}")
            return out
        torch.manual_seed(cfg.engine.seed)
        rand_model = build_model(cfg).eval()
        ks = [int(k) for k in cfg.eval.knn_k.split(",") if k.strip()]
        k = min(ks, key=lambda kk: abs(kk - 20)) if ks else 20
        scores = {}
        # The protocol of `ldae-fast eval --protocols linear-fast` with its defaults (device auto,
        # its feature precision, head seed 0, the EMA weights), so eval on the checkpoint prints the
        # same probe number; features in bf16 on a GPU and fp32 on a CPU move it by a point or two.
        device = resolve_device("auto")
        method = result.method.to(device)
        model, rand_model = model.to(device), rand_model.to(device)
        bs = cfg.eval.probe_batch_size
        sources = {
            "pretrained": lambda: _encoder_features(probe_view(probe_encoder(model, cfg), cfg, method), train_arr,
                                                    val_arr, bs),
            "random-init": lambda: _encoder_features(probe_view(probe_encoder(rand_model, cfg), cfg, method),
                                                     train_arr, val_arr, bs),
            # The images themselves, as the probe and kNN see them (resized, normalised, flattened):
            # what a task asks of an encoder beyond what its pixels already give.
            "raw pixels": lambda: (train_arr[0].flatten(1).float(), val_arr[0].flatten(1).float()),
        }
        for name, feats_of in sources.items():
            feats = feats_of()  # one feature pass serves both the probe and the kNN
            torch.manual_seed(cfg.engine.seed)
            probe = train_head_cached(feats[0], train_arr[1], feats[1], val_arr[1], epochs=cfg.eval.probe_epochs,
                                      batch_size=bs, blr=cfg.eval.probe_blr, seed=PROBE_SEED)
            # Centred on the train mean: a random encoder's features share one large direction
            # that swamps the cosine similarity; removing it is fair to every row.
            mu = feats[0].mean(0, keepdim=True)
            knn = knn_classify(feats[0] - mu, train_arr[1], feats[1] - mu, val_arr[1], ks=[k])[k]
            # Whitened (eval/rows.py, fitted on the train features only): every direction gets equal
            # say, not the few (colour, brightness) that hold most of a pooled feature's variance.
            white = fit_tensor(feats[0], "whitened")
            wknn = knn_classify(white(feats[0]), train_arr[1], white(feats[1]), val_arr[1], ks=[k])[k]
            scores[name] = (probe["top1"], knn["top1"], wknn["top1"])
        chance = 100.0 / max(1, int(train_arr[1].max()) + 1)
        (ours, ours_knn, ours_w), (floor, floor_knn, floor_w) = scores["pretrained"], scores["random-init"]
        raw, raw_knn, raw_w = scores["raw pixels"]
        seconds = time.time() - t0
        weights = "EMA" if result.ema is not None else "trained"
        log(f"frozen-encoder evaluation of the {weights} weights ({len(train_arr[1])} train / {len(val_arr[1])} "
            f"val images; linear probe: {cfg.eval.probe_epochs} epochs on cached features, seed {PROBE_SEED}, "
            f"{feature_settings(device)}, as `ldae-fast eval --checkpoint {cfg.engine.out_dir}`; kNN: k={k}, "
            f"features centred on the train mean, and whitened with the train features' PCA (eval's knn rows: "
            f"raw features); {seconds:.0f}s):\n"
            f"                        probe top-1   kNN top-1   kNN top-1\n"
            f"                                      (centred)  (whitened)\n"
            f"  pretrained encoder    {ours:10.1f}%  {ours_knn:9.1f}%  {ours_w:9.1f}%\n"
            f"  random-init encoder   {floor:10.1f}%  {floor_knn:9.1f}%  {floor_w:9.1f}%\n"
            f"  raw pixels            {raw:10.1f}%  {raw_knn:9.1f}%  {raw_w:9.1f}%\n"
            f"  chance                {chance:10.1f}%  {chance:9.1f}%  {chance:9.1f}%")
        out.update(probe_top1=ours, random_top1=floor, knn_top1=ours_knn, random_knn_top1=floor_knn,
                   raw_pixels_top1=raw, raw_pixels_knn_top1=raw_knn, knn_whitened_top1=ours_w,
                   random_knn_whitened_top1=floor_w, raw_pixels_knn_whitened_top1=raw_w, chance=chance,
                   eval_settings=dict(train_images=len(train_arr[1]), val_images=len(val_arr[1]),
                                      probe_epochs=cfg.eval.probe_epochs, probe_blr=cfg.eval.probe_blr,
                                      probe_batch_size=bs, knn_k=k, knn_features="centred",
                                      probe_head_seed=PROBE_SEED, torch_seed_before_each_probe=cfg.engine.seed,
                                      weights=weights, features=feature_settings(device),
                                      random_init_seed=cfg.engine.seed),
                   eval_seconds=seconds)
    return out


def epilogue_skip_reason(cfg: Config) -> str:
    """Why the demo's figure and probe cannot run on this config's data ('' when they can): they
    read held-out images, which shard data names in data.val_shards."""
    if cfg.data.source in ("wds", "resident") and not cfg.data.val_shards.strip():
        return ("data.val_shards is not set (they evaluate on held-out images; set it, or run "
                "`ldae-fast eval` on the checkpoint later)")
    return ""


def _encoder_features(enc, train_arr, val_arr, batch_size: int):
    from .eval.features import extract_features

    return (extract_features(enc, train_arr[0], batch_size=batch_size),
            extract_features(enc, val_arr[0], batch_size=batch_size))


RESULTS_FILE = "results.json"


def write_results(cfg: Config, argv: list[str], pretraining: dict, demo: dict) -> Path:
    """Every number the demo printed, with the settings and seeds that produced it, as
    `<engine.out_dir>/results.json`: what bench/seed_table.py assembles the docs' seed tables from."""
    import json
    import platform
    from datetime import datetime, timezone

    import torch

    rec = {
        "schema": 1, "preset": cfg.preset, "seed": cfg.engine.seed, "argv": list(argv),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "pretraining": pretraining, "evaluation": demo, "config": cfg.to_dict(),
    }
    path = Path(cfg.engine.out_dir) / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True, default=str))
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """User errors end as one stderr line and an exit code of their kind (see errors.py);
    --debug or LDAE_DEBUG=1 adds the traceback."""
    return run_cli(_main, argv, "train.py")


def _main(argv: list[str]) -> int:
    if "--version" in argv:
        from . import __version__
        print(f"ldae-fast {__version__} (train.py)")
        return 0
    if any(a in ("-h", "--help") for a in argv):
        print(usage(argv))
        return 0
    cfg, rest = parse_cli(argv)
    rest = [a for a in rest if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if rest:
        raise UsageError(f"unknown arguments: {' '.join(rest)} (see python train.py --help)")

    from .engine.loop import train

    backend_factory = None
    if cfg.engine.backend == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise UsageError("engine.backend=deepspeed needs DeepSpeed, which is not installed: "
                             "pip install 'ldae-fast[scale]' (or run on one device with --engine.backend=single)")
        from .engine.deepspeed_backend import DeepSpeedBackend
        backend_factory = DeepSpeedBackend
    elif cfg.engine.backend == "ddp":
        from .engine.ddp_backend import DDPBackend
        backend_factory = DDPBackend
    t0 = time.time()
    result = train(cfg, backend_factory=backend_factory)
    if result.model is None or result.steps == 0:
        return 0
    is_main = getattr(result, "is_main", True)
    pretraining = {"seconds": time.time() - t0, "steps": result.steps, "checkpoint": str(result.checkpoint)}
    if is_main and result.losses:
        first, last = result.losses[0][1], result.losses[-1][1]
        pretraining.update(loss_first=first, loss_last=last, images_per_s=result.images_per_s)
        print(f"pretraining done in {pretraining['seconds']:.0f}s: loss {first:.4f} -> {last:.4f}, "
              f"{result.images_per_s:.0f} images/s, checkpoint {result.checkpoint}")
    small = cfg.preset.endswith("demo") or cfg.data.source == "synthetic"
    if is_main and not small and (cfg.eval.figure or cfg.eval.probe):
        # The in-RAM epilogue is sized for the demos; a run on the user's shards may be ImageNet.
        print(f"figure and linear probe skipped: they run at the end of demo presets and synthetic data; "
              f"evaluate this run with `ldae-fast eval --checkpoint {cfg.engine.out_dir}` (docs/eval.md)")
    if is_main and small and (cfg.eval.figure or cfg.eval.probe):
        if cfg.engine.backend == "deepspeed" and cfg.engine.zero_stage == 3 and result.checkpoint is not None:
            # Under ZeRO-3 the in-memory model holds only this rank's shard: evaluate the saved one.
            from .eval.reader import load_for_eval
            _, model, _ = load_for_eval(result.checkpoint)
            result.model, result.ema = model, None
        skip = epilogue_skip_reason(cfg)
        if skip:
            print(f"figure and linear probe skipped: {skip}")
        else:
            demo = finish_demo(cfg, result)
            print(f"results: {write_results(cfg, argv, pretraining, demo)}")
    if is_main:
        print(f"run directory: {cfg.engine.out_dir} (config.json, metrics.jsonl, checkpoints/)")
    return 0
