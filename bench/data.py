#!/usr/bin/env python
"""Input-pipeline benchmark: images/s of the training stream's stages on WebDataset shards.

Stages, each on every dataset:
  raw         read the tar members (our streaming reader, no decode): the I/O + untar ceiling
  cpu_decode  the trainer's TrainStream with data.num_workers = W for each --workers value: PIL
              JPEG decode, random-resized crop, flip, batching, normalisation in the workers
  gpu_decode  the same stream with data.gpu_decode=true (JPEG decode and crop on the GPU, workers
              only read and draw crop boxes); CUDA only

Datasets: the shards given by --shards (default: the Tiny ImageNet train shards in
../shared/data/tinyimagenet-wds, if present) and synthetic 256x256 JPEG shards written into a
temporary directory with the project's shard writer (ldae_fast.data.shards.write_shards), so the
decode cost of ImageNet-like JPEGs is measured on any machine.

The stream runs with data.resampled=true so any worker count works on few shards; the first
batch (worker start-up) is not timed. Results go through bench/results_io.write_result on a GPU
machine (or with --write); the command that reproduces the run is printed either way.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Runnable as `python bench/data.py` from a checkout without installing the package.
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import results_io  # noqa: E402
import torch  # noqa: E402

import ldae_fast.methods  # noqa: E402,F401 (registers the methods' config sections and presets)
from ldae_fast.config import build_config  # noqa: E402
from ldae_fast.data import BadSampleCounter, build_train_stream, expand_urls, write_shards  # noqa: E402
from ldae_fast.data.tar import iter_shard  # noqa: E402
from ldae_fast.data.transforms import gpu_decode_available  # noqa: E402
from ldae_fast.engine.profiling import profile_calls  # noqa: E402

DEFAULT_SHARDS = ROOT.parent / "shared" / "data" / "tinyimagenet-wds" / "train-{000000..000009}.tar.gz"


def make_jpeg_shards(root: Path, images: int, side: int = 256, classes: int = 10, per_shard: int = 0,
                     seed: int = 0) -> str:
    """Write `images` JPEGs of side x side in an ImageFolder tree and shard them; -> brace pattern."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    src = root / "folder"
    chunk = 64
    for lo in range(0, images, chunk):
        n = min(chunk, images - lo)
        # Smooth colour fields plus a little noise: compresses like a photograph, not like
        # white noise (which would make the decode unrealistically expensive).
        coarse = torch.rand(n, 3, 8, 8, generator=g)
        imgs = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
        imgs = (imgs + 0.05 * torch.randn(n, 3, side, side, generator=g)).clamp(0, 1)
        arrs = (imgs.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        for k in range(n):
            i = lo + k
            d = src / f"c{i % classes:03d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arrs[k]).save(d / f"{i:06d}.jpg", quality=90)
    per_shard = per_shard or max(1, images // 8)
    paths = write_shards(src, str(root / "shards" / "train-%06d.tar"), max_count=per_shard, seed=seed)
    return f"{root / 'shards'}/train-{{000000..{len(paths) - 1:06d}}}.tar"


def bench_raw(pattern: str, max_images: int) -> dict[str, Any]:
    urls = expand_urls(pattern, "--shards")
    counter = BadSampleCounter(1.0, "bench")
    n = nbytes = 0
    t0 = time.perf_counter()
    while n < max_images:  # loop over the shards again when they hold fewer images
        before = n
        for url in urls:
            for s in iter_shard(url, counter):
                n += 1
                nbytes += len(s.data)
                if n >= max_images:
                    break
            if n >= max_images:
                break
        if n == before:
            raise RuntimeError(f"no readable sample in {pattern}")
    dt = time.perf_counter() - t0
    return {"stage": "raw", "workers": 0, "images": n, "seconds": round(dt, 4),
            "images_per_s": round(n / dt, 1), "MB_per_s": round(nbytes / dt / 2**20, 1)}


def bench_stream(pattern: str, epoch_size: int, img_size: int, batch: int, batches: int, workers: int,
                 gpu: bool, profile_dir: Path | None = None, profile_batches: int = 3) -> dict[str, Any]:
    """images/s of the training stream over `batches` batches (after the first); with profile_dir,
    then traces `profile_batches` more under torch.profiler (the main process only: with workers,
    it shows the waiting, not the decoding)."""
    cfg = build_config("demo", {
        "data.source": "wds", "data.train_shards": pattern, "data.epoch_size": str(epoch_size),
        "data.img_size": str(img_size), "data.batch_size": str(batch), "data.num_workers": str(workers),
        "data.resampled": "true", "data.gpu_decode": str(gpu).lower(), "data.shuffle_buffer": str(4 * batch),
    })
    device = torch.device("cuda") if gpu else None
    stream = build_train_stream(cfg, device=device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    try:
        next(stream)  # worker start-up and the first shard open: not what a long run pays per batch
        sync()
        t0 = time.perf_counter()
        for _ in range(batches):
            x, _ = next(stream)
        sync()
        dt = time.perf_counter() - t0
        if profile_dir is not None:
            stage = "gpu_decode" if gpu else "cpu_decode"
            prof = profile_calls(lambda: next(stream), profile_dir / f"{stage}_w{workers}", profile_batches,
                                 verbose=False)
            print(f"  profile: {prof.table_path}")
    finally:
        stream.close()
    assert x.shape == (batch, 3, img_size, img_size), x.shape
    n = batches * batch
    return {"stage": "gpu_decode" if gpu else "cpu_decode", "workers": workers, "images": n,
            "seconds": round(dt, 4), "images_per_s": round(n / dt, 1)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default=str(DEFAULT_SHARDS),
                    help="shard pattern to measure ('' or 'none': only the synthetic shards)")
    ap.add_argument("--shards-img-size", type=int, default=64, help="training crop side for --shards")
    ap.add_argument("--synthetic", type=int, default=2048, help="synthetic 256x256 JPEGs to write (0: none)")
    ap.add_argument("--synthetic-img-size", type=int, default=224, help="training crop side for them")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=20, help="timed batches per stream measurement")
    ap.add_argument("--raw-images", type=int, default=20000, help="samples read in the raw stage")
    ap.add_argument("--workers", default="0,2,4,8", help="comma-separated data.num_workers values")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU-decode stage even with CUDA")
    results_io.add_output_flags(ap, "write results without a GPU too", exact_file=False)
    ap.add_argument("--profile", nargs="?", const="runs/profile/data", default=None, metavar="DIR",
                    help="after each stream measurement, trace --profile-batches batches with torch.profiler "
                         "into DIR/<dataset>/<stage>_w<workers>/")
    ap.add_argument("--profile-batches", type=int, default=3, help="batches recorded by --profile")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = results_io.announce("data.py", argv)
    cores = os.cpu_count() or 1
    workers = sorted({int(w) for w in args.workers.split(",") if w.strip() and int(w) <= cores})
    gpu = torch.cuda.is_available() and gpu_decode_available() and not args.no_gpu

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ldae-bench-data-") as tmp:
        datasets: list[tuple[str, str, int, int]] = []
        if args.shards and args.shards.lower() != "none":
            try:
                urls = expand_urls(args.shards, "--shards")
            except Exception as e:  # missing default data: say so, go on with the synthetic set
                print(f"skipping --shards {args.shards}: {e}")
            else:
                # The epoch size only scales resampling; an estimate from the files is enough.
                datasets.append(("shards", args.shards, max(1, 1000 * len(urls)), args.shards_img_size))
        if args.synthetic > 0:
            t0 = time.perf_counter()
            pattern = make_jpeg_shards(Path(tmp), args.synthetic)
            print(f"wrote {args.synthetic} synthetic 256x256 JPEGs into shards {pattern} "
                  f"in {time.perf_counter() - t0:.1f}s")
            datasets.append(("synthetic-256", pattern, args.synthetic, args.synthetic_img_size))
        for name, pattern, epoch_size, img_size in datasets:
            base = {"dataset": name, "img_size": img_size, "batch": args.batch_size}
            results = [bench_raw(pattern, args.raw_images)]
            prof_dir = Path(args.profile) / name if args.profile else None
            for use_gpu in (False, True) if gpu else (False,):
                for w in workers:
                    results.append(bench_stream(pattern, epoch_size, img_size, args.batch_size, args.batches, w,
                                                use_gpu, prof_dir, args.profile_batches))
            for r in results:
                row = {**base, **r}
                rows.append(row)
                extra = f", {row['MB_per_s']} MB/s" if "MB_per_s" in row else ""
                print(f"{name:14s} {row['stage']:10s} workers={row['workers']:<2d} "
                      f"{row['images_per_s']:>10.1f} images/s{extra}")
    if not gpu:
        print("no GPU decode stage: " + ("--no-gpu" if args.no_gpu else "CUDA or torchvision.io.decode_jpeg unavailable"))
    if torch.cuda.is_available() or args.write:
        js, md = results_io.write_result("data", rows, {"command": command, "cpu_cores": cores},
                                         out_dir=args.out_dir)
        print(f"results: {js} and {md}")
    return rows


if __name__ == "__main__":
    main()
