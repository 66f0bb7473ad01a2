"""The README's "From a downloaded ImageNet" recipe runs as written: its bash block, unchanged, on
a fake ImageNet tree with both real layouts (train as synset folders; val one flat folder labelled
by the devkit's meta.mat and ground truth), with the tiny sizes the README's variables allow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from test_imagenet_layout import write_meta_mat

ROOT = Path(__file__).resolve().parents[1]
SYNSETS = ["n02119789", "n01440764", "n04596742", "n03000134"]


def recipe() -> str:
    text = (ROOT / "README.md").read_text()
    sec = text.split("## From a downloaded ImageNet", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", sec, re.S).group(1)


def _jpeg(path: Path, label: int, rng: np.random.Generator) -> None:
    hue = np.array([(label * 97) % 256, (label * 41 + 80) % 256, (255 - label * 53) % 256], np.float32)
    arr = np.clip(hue + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG")


def fake_imagenet(root: Path) -> None:
    rng = np.random.default_rng(0)
    order = sorted(SYNSETS)
    for syn in SYNSETS:
        for j in range(10):
            _jpeg(root / "train" / syn / f"{syn}_{j + 1}.JPEG", order.index(syn), rng)
    devkit = root / "ILSVRC2012_devkit_t12" / "data"
    ids = {syn: i + 1 for i, syn in enumerate(SYNSETS)}  # the devkit's ids, not the sorted order
    write_meta_mat(devkit / "meta.mat", [(i, w) for w, i in ids.items()])
    truth = []
    for n in range(1, 13):
        syn = SYNSETS[n % 4]
        _jpeg(root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG", order.index(syn), rng)
        truth.append(str(ids[syn]))
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(truth) + "\n")


def _wrappers(bindir: Path) -> None:
    """`ldae-fast` and `torchrun` on PATH as this interpreter runs them, importing this checkout."""
    bindir.mkdir()
    for name, module in (("ldae-fast", "ldae_fast.cli"), ("torchrun", "torch.distributed.run")):
        p = bindir / name
        p.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        p.chmod(0o755)


def test_readme_imagenet_recipe_runs_as_written(tmp_path):
    fake_imagenet(tmp_path / "imagenet")
    _wrappers(tmp_path / "bin")
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").symlink_to(ROOT / "train.py")
    tiny_train = ("--data.train_shards=shards/imagenet/train-000000.tar --data.val_shards=shards/imagenet/val-000000.tar "
                  "--data.epoch_size=40 --model.size=tiny --data.img_size=32 --engine.steps=2 "
                  "--model.patch_size=8 --tokenizer.fit_images=40 --data.batch_size=8 --data.num_workers=0 "
                  "--engine.kernels=reference --engine.progress=false")
    env = dict(os.environ, IMAGENET=str(tmp_path / "imagenet"), NPROC="1", TRAIN_ARGS=tiny_train,
               EVAL_ARGS="--readers 4 --batch-size 8 --epochs 1 --num-workers 0 --micro-batch 8 --blrs 0.1",
               FT_ARGS="--readers 4 --num-workers 0 --micro-batch 4 --finetune-batch-size 8 --finetune-steps 2",
               PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1", MASTER_PORT="0")
    script = tmp_path / "recipe.sh"
    script.write_text("set -eu\n" + recipe())
    p = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"recipe exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    shards = work / "shards" / "imagenet"
    assert (shards / "train-000000.tar").exists() and (shards / "val-000000.tar").exists()
    assert [ln.split()[-1] for ln in (shards / "classes.tsv").read_text().split("\n") if ln] == sorted(SYNSETS)
    probes = json.loads((work / "runs" / "eval" / "vithalfl-probes" / "eval.json").read_text())
    ft = json.loads((work / "runs" / "eval" / "vithalfl-finetune" / "eval.json").read_text())
    assert {r["protocol"] for r in ft["rows"]} == {"finetune", "finetune (EMA 0.9999)"}
    assert {"linear", "knn k=20", "linear (fast, cached features)"} <= {r["protocol"] for r in probes["rows"]}
    for got in (probes, ft):
        assert got["val_images"] == 12 and got["num_classes"] == 4 and got["train_images"] == 40
