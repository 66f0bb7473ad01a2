"""make-shards on ImageNet's own layouts (issue 22): train as synset folders, val as one flat
folder with a label file; both splits share the sorted-synset class index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldae_fast.data.badsamples import BadSampleCounter
from ldae_fast.data.shards import main as make_shards
from ldae_fast.data.tar import iter_shard

SYNSETS = ["n02119789", "n01440764", "n04596742"]  # not in sorted order on purpose


def _jpeg(path: Path, colour: int) -> None:
    arr = np.full((20, 24, 3), colour, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG")


@pytest.fixture
def fake_imagenet(tmp_path):
    root = tmp_path / "imagenet"
    for k, syn in enumerate(SYNSETS):
        for j in range(3):
            _jpeg(root / "train" / syn / f"{syn}_{j + 1}.JPEG", 40 * k)
    truth = {}
    for i in range(1, 7):
        syn = SYNSETS[i % 3]
        name = f"ILSVRC2012_val_{i:08d}"
        _jpeg(root / "val" / f"{name}.JPEG", 40 * (i % 3))
        truth[name] = syn
    # Kaggle's LOC_val_solution.csv: a header, the id without extension, boxes after the synset.
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{n},{s} 1 2 30 40 {s} 3 4 10 12\n" for n, s in truth.items()))
    # Caffe's val.txt: file name and the sorted-synset index.
    order = sorted(SYNSETS)
    (root / "val.txt").write_text("".join(f"{n}.JPEG {order.index(s)}\n" for n, s in truth.items()))
    return root, truth


def _labels(pattern_dir: Path, split: str) -> dict[str, int]:
    out = {}
    for shard in sorted(pattern_dir.glob(f"{split}-*.tar")):
        out.update({s.key: s.label for s in iter_shard(str(shard), BadSampleCounter(0.0))})
    return out


def test_make_shards_imagenet_train_and_flat_val(fake_imagenet, tmp_path):
    root, truth = fake_imagenet
    out = tmp_path / "shards"
    # The README recipe's two commands, as written there.
    assert make_shards([str(root / "train"), str(out / "train-%06d.tar"), "--maxcount", "4"]) == 0
    assert make_shards([str(root / "val"), str(out / "val-%06d.tar"),
                        "--val-labels", str(root / "LOC_val_solution.csv")]) == 0
    order = sorted(SYNSETS)
    assert (out / "classes.tsv").read_text().split("\n")[0] == f"0\t{order[0]}"
    train = _labels(out, "train")
    assert len(train) == 9 and all(lab == order.index(k.split("_")[0]) for k, lab in train.items())
    val = _labels(out, "val")
    assert val == {n: order.index(s) for n, s in truth.items()}
    # Caffe's val.txt (indices), classes from the train folder: the same labels.
    out2 = tmp_path / "shards2"
    assert make_shards([str(root / "val"), str(out2 / "val-%06d.tar"), "--val-labels", str(root / "val.txt"),
                        "--classes", str(root / "train")]) == 0
    assert _labels(out2, "val") == val


def test_flat_val_errors_name_the_line(fake_imagenet, tmp_path, capsys):
    root, truth = fake_imagenet
    bad = tmp_path / "bad.csv"
    lines = [f"{n},{s}" for n, s in truth.items()]
    bad.write_text("\n".join(lines[:-1] + [lines[-1].split(",")[0] + ",n09999999"]) + "\n")
    rc = make_shards([str(root / "val"), str(tmp_path / "o" / "val-%06d.tar"), "--val-labels", str(bad),
                      "--classes", str(root / "train")])
    assert rc == 2 and "line 6" in capsys.readouterr().err and not (tmp_path / "o" / "val-000000.tar").exists()
    short = tmp_path / "short.csv"
    short.write_text("\n".join(lines[:-1]) + "\n")
    rc = make_shards([str(root / "val"), str(tmp_path / "o" / "val-%06d.tar"), "--val-labels", str(short),
                      "--classes", str(root / "train")])
    assert rc == 2 and "have no line" in capsys.readouterr().err
    # Without --classes and no classes.tsv beside the output: the usage error says what to do.
    rc = make_shards([str(root / "val"), str(tmp_path / "p" / "val-%06d.tar"), "--val-labels", str(short)])
    assert rc == 2 and "--classes" in capsys.readouterr().err
