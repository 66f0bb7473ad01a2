#!/usr/bin/env python
"""Feature-extraction images/s: our streaming eval path against a peer that reads data the way
MAE's main_linprobe.py does, in the same run.

ours   shards -> eval/stream.py (the pretraining tar reader, PIL resize + centre crop in the
       DataLoader workers, uint8 batches) -> normalise on the device -> our ViT encoder, pooled
peer   the same images as an ImageFolder tree -> torchvision.datasets.ImageFolder with
       Resize + CenterCrop + ToTensor + Normalize -> DataLoader(pin_memory) -> a timm
       VisionTransformer of the same width / depth / heads / patch, mean-pooled

Both run frozen, without autograd, bf16 autocast on CUDA, fp32 on CPU, the same batch and worker
count; the first batch (worker start-up) is not timed. Images: --shards (a train / val pattern
with an ImageFolder twin is not at hand for real data) or, by default, synthetic 256 x 256 JPEGs
written by bench/data.py's writer, both as shards and as the folder tree they come from.
Writes through bench/results_io.py on a GPU (or with --write); prints the reproducing command.
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
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import results_io  # noqa: E402
import torch  # noqa: E402
from data import make_jpeg_shards  # noqa: E402  (bench/data.py)

from ldae_fast.data.transforms import normalize  # noqa: E402
from ldae_fast.data.urls import expand_urls  # noqa: E402
from ldae_fast.eval.features import autocast_for, pool_features  # noqa: E402
from ldae_fast.eval.stream import EvalStream, SplitSpec  # noqa: E402


def _our_encoder(size: str, img_size: int, patch: int, device):
    import ldae_fast.methods  # noqa: F401 (registers the methods' config sections and presets)
    from ldae_fast.config import build_config
    from ldae_fast.methods import build_model

    cfg = build_config("demo", {"model.size": size, "model.patch_size": str(patch),
                                "data.img_size": str(img_size), "ldae.layout": "mae"})
    return build_model(cfg).encoder.to(device).eval(), cfg.model


def _timm_peer(m, img_size: int, device):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=m.patch_size, embed_dim=m.width, depth=m.encoder_depth,
                             num_heads=m.num_heads, num_classes=0, global_pool="avg").to(device).eval()


def _timed(batches, step, warm: int = 1) -> tuple[float, int]:
    n, t0 = 0, None
    for i, b in enumerate(batches):
        k = step(b)
        if i + 1 == warm:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            continue
        if t0 is not None:
            n += k
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (n / (time.perf_counter() - t0) if t0 is not None and n else 0.0), n


@torch.no_grad()
def bench_ours(pattern: str, enc, img_size: int, batch: int, workers: int, device) -> dict[str, Any]:
    urls = expand_urls(pattern, "--shards")
    spec = SplitSpec(tuple(urls), "--shards", img_size, False, readers=max(1, min(len(urls), max(1, workers))))
    stream = EvalStream(spec, 0, 1, workers)

    def step(b):
        x = normalize(b[0].to(device, non_blocking=True))
        with autocast_for(device):
            pool_features(enc, x, "avg")
        return x.shape[0]

    ips, n = _timed(stream.once(chunk=batch), step)
    return {"path": "ours (shards, eval/stream.py)", "images_per_s": round(ips, 1), "images": n}


@torch.no_grad()
def bench_peer(folder: Path, model, img_size: int, batch: int, workers: int, device) -> dict[str, Any]:
    from torchvision import datasets, transforms

    from ldae_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize_size

    tf = transforms.Compose([transforms.Resize(eval_resize_size(img_size), interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(img_size), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(str(folder), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=False)

    def step(b):
        x = b[0].to(device, non_blocking=True)
        with autocast_for(device):
            model(x)
        return x.shape[0]

    ips, n = _timed(loader, step)
    return {"path": "peer (ImageFolder + DataLoader + timm ViT)", "images_per_s": round(ips, 1), "images": n}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1024, help="synthetic 256x256 JPEGs to write")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--size", default="B", help="model size of both encoders (tiny, S, B, halfL, L)")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=1, help="alternating ours/peer measurements")
    results_io.add_output_flags(ap, "write results without a GPU too", exact_file=False)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    command = results_io.announce("eval_extract.py", argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enc, m = _our_encoder(a.size, a.img_size, a.patch, device)
    peer = _timm_peer(m, a.img_size, device)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ldae-bench-eval-") as tmp:
        pattern = make_jpeg_shards(Path(tmp), a.images, per_shard=max(1, a.images // max(1, 2 * a.workers)))
        folder = Path(tmp) / "folder"
        base = {"model": f"ViT-{a.size}/{a.patch}", "img_size": a.img_size, "batch": a.batch_size,
                "workers": a.workers, "device": str(device)}
        for _ in range(max(1, a.repeats)):
            rows.append({**base, **bench_ours(pattern, enc, a.img_size, a.batch_size, a.workers, device)})
            rows.append({**base, **bench_peer(folder, peer, a.img_size, a.batch_size, a.workers, device)})
    best = {}
    for r in rows:
        best[r["path"]] = max(best.get(r["path"], 0.0), r["images_per_s"])
        print(f"{r['path']:45s} {r['images_per_s']:>9.1f} images/s ({r['images']} timed)")
    ours, peer_ips = (best[k] for k in sorted(best, key=lambda k: not k.startswith("ours")))
    ratio = ours / peer_ips if peer_ips else float("nan")
    print(f"ours / peer = {ratio:.2f}x (best of {a.repeats})")
    for r in rows:
        r["ratio_vs_peer"] = round(ratio, 3)
    if torch.cuda.is_available() or a.write:
        js, md = results_io.write_result("eval_extract", rows, {"command": command}, out_dir=a.out_dir)
        print(f"results: {js} and {md}")
    return rows


if __name__ == "__main__":
    main()
