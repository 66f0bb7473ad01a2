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


# The devkit: a level-5 MAT file written here the way MATLAB writes meta.mat (struct array,
# compressed), to check our reader without scipy.
def _el(typ: int, payload: bytes) -> bytes:
    import struct

    if len(payload) <= 4 and typ != 14:
        return struct.pack("<HH", typ, len(payload)) + payload.ljust(4, b"\0")
    return struct.pack("<II", typ, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def _matrix(cls: int, dims: tuple[int, ...], body: bytes, name: str = "") -> bytes:
    import struct

    flags = _el(6, struct.pack("<II", cls, 0))
    d = _el(5, struct.pack(f"<{len(dims)}i", *dims))
    return _el(14, flags + d + _el(1, name.encode()) + body)


def _double(v: float) -> bytes:
    import struct

    return _matrix(6, (1, 1), _el(9, struct.pack("<d", v)))


def _char(text: str) -> bytes:
    import struct

    return _matrix(4, (1, len(text)), _el(4, struct.pack(f"<{len(text)}H", *map(ord, text))))


def write_meta_mat(path: Path, synsets: list[tuple[int, str]]) -> None:
    import zlib

    fields = [b"ILSVRC2012_ID", b"WNID", b"children"]
    width = 32
    names = b"".join(f.ljust(width, b"\0") for f in fields)
    body = _el(5, width.to_bytes(4, "little")) + _el(1, names)
    for i, wnid in synsets:
        body += _double(float(i)) + _char(wnid) + _el(14, b"")  # children: an empty matrix
    var = _matrix(2, (len(synsets), 1), body, "synsets")
    header = b"MATLAB 5.0 MAT-file, written by a test".ljust(116, b" ") + b"\0" * 8 + b"\x00\x01IM"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + _el(15, zlib.compress(var)))


def test_make_shards_val_from_the_devkit(fake_imagenet, tmp_path):
    root, truth = fake_imagenet
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    # The devkit's own ids: not the sorted order (id 1 is n02119789, as in the real devkit).
    ids = {"n02119789": 1, "n04596742": 2, "n01440764": 3, "n00001740": 4}  # 4: an inner node
    write_meta_mat(devkit / "data" / "meta.mat", [(i, w) for w, i in ids.items()])
    lines = [str(ids[truth[f"ILSVRC2012_val_{n:08d}"]]) for n in range(1, 7)]
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(lines) + "\n")
    order = sorted(SYNSETS)
    for labels in (devkit, devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"):
        out = tmp_path / f"s-{labels.name}"
        assert make_shards([str(root / "val"), str(out / "val-%06d.tar"), "--val-labels", str(labels),
                            "--classes", str(root / "train")]) == 0
        assert _labels(out, "val") == {n: order.index(s) for n, s in truth.items()}
    from ldae_fast.data.matfile import load_mat

    syn = load_mat(devkit / "data" / "meta.mat")["synsets"]
    assert [s["WNID"] for s in syn] == list(ids) and syn[0]["children"].size == 0
