"""ImageNet's validation layout: one flat folder of images plus a label file.

The train split already is an ImageFolder tree (`train/<synset>/<image>.JPEG`), whose sorted
synset folders give the standard class index 0..999 (torchvision's ImageFolder, timm). The val
split ships flat (`val/ILSVRC2012_val_00000001.JPEG` ...) with its labels elsewhere; this module
reads its labels from a file of one line per image, `FILENAME<sep>LABEL[ ...]` (sep a comma, tab
or spaces), or from the devkit:

- LABEL a synset (`n01751748`): mapped through the class list (classes.tsv that make-shards wrote
  beside the train shards, or the train folder's synset folders), so val and train share one
  index; Kaggle's LOC_val_solution.csv (`ImageId,PredictionString`, the string starting with the
  synset) is this form, header line included;
- LABEL an integer: taken as the class index itself (Caffe's val.txt, whose index is the sorted
  synset order);
- the devkit (`ILSVRC2012_devkit_t12/`, or its data/ILSVRC2012_validation_ground_truth.txt):
  line n labels ILSVRC2012_val_<n>, by an ILSVRC2012_ID that data/meta.mat maps to a synset.

FILENAME may omit its extension. A listed file that is missing, an image without a label, or a
synset outside the class list is an error naming the file and line, before any shard is written.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

_SYNSET = re.compile(r"n\d{8}")


class LayoutError(ValueError):
    """The flat folder and its label file disagree (make-shards turns it into a usage error)."""


def read_classes(path: str | Path) -> list[str]:
    """Class names in index order: a classes.tsv (`index<TAB>name[<TAB>words]`), a plain list (one
    name a line), or an ImageFolder root (its sorted subfolders)."""
    p = Path(path)
    if p.is_dir():
        names = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not names:
            raise LayoutError(f"--classes {p}: no class subfolders")
        return names
    if not p.is_file():
        raise LayoutError(f"--classes {p}: no such file or folder")
    names: list[str] = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        parts = line.strip().split("\t") if "\t" in line else line.strip().split()
        if not parts:
            continue
        if len(parts) >= 2 and parts[0].isdigit():
            if int(parts[0]) != len(names):
                raise LayoutError(f"--classes {p} line {n}: index {parts[0]}, expected {len(names)}")
            names.append(parts[1])
        else:
            names.append(parts[0])
    if not names:
        raise LayoutError(f"--classes {p}: empty")
    return names


def list_flat_folder(src: str | Path, labels_file: str | Path, classes: list[str],
                     suffixes: set[str]) -> list[tuple[Path, int]]:
    """(file, class index) of every image (a file with one of `suffixes`) of the flat folder
    `src`, labelled by `labels_file`."""
    root, lf = Path(src), Path(labels_file)
    if not root.is_dir():
        raise LayoutError(f"{root} is not a directory")
    if not lf.exists():
        raise LayoutError(f"--val-labels {lf}: no such file or folder")
    files = {}
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix.lower() in suffixes and not f.name.startswith("."):
            files[f.name] = f
            files.setdefault(f.stem, f)
    index = {c: i for i, c in enumerate(classes)}
    labelled: dict[Path, int] = {}
    for n, name, label in _label_lines(lf):
        if _SYNSET.fullmatch(label):
            if label not in index:
                raise LayoutError(f"--val-labels {lf} line {n}: synset {label} is not among the "
                                  f"{len(classes)} classes of --classes")
            ci = index[label]
        elif label.isdigit():
            ci = int(label)
            if ci >= len(classes):
                raise LayoutError(f"--val-labels {lf} line {n}: class index {ci} >= {len(classes)} classes")
        elif n == 1:
            continue  # a header line (ImageId,PredictionString)
        else:
            raise LayoutError(f"--val-labels {lf} line {n}: label {label!r} is neither a synset nor an index")
        f = files.get(name) or files.get(Path(name).stem)
        if f is None:
            raise LayoutError(f"--val-labels {lf} line {n}: {name} is not an image in {root}")
        labelled[f] = ci
    unlabelled = [f for f in set(files.values()) if f not in labelled]
    if unlabelled:
        raise LayoutError(f"{len(unlabelled)} image(s) of {root} have no line in {lf}, e.g. "
                          f"{sorted(unlabelled)[0].name}")
    if not labelled:
        raise LayoutError(f"--val-labels {lf}: no labelled image")
    return sorted(labelled.items())


def _label_lines(lf: Path):
    """(line number, file name, label) of a label file, or of the devkit (see devkit_lines)."""
    if lf.is_dir() or lf.name.endswith("_validation_ground_truth.txt"):
        yield from devkit_lines(lf)
        return
    for n, line in enumerate(lf.read_text().splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        parts = [x for x in re.split(r"[,\t ]+", text) if x]
        if len(parts) < 2:
            raise LayoutError(f"--val-labels {lf} line {n}: expected FILENAME,LABEL, got {text[:60]!r}")
        yield n, parts[0], parts[1]


def devkit_lines(path: Path):
    """The devkit's labels as (line, ILSVRC2012_val_NNNNNNNN, synset): line n of
    data/ILSVRC2012_validation_ground_truth.txt is image n's ILSVRC2012_ID, an index into the
    synsets of data/meta.mat (not the sorted-synset order). `path`: the devkit folder
    (ILSVRC2012_devkit_t12) or the ground-truth file inside it."""
    from .matfile import MatFileError, load_mat

    gt = path / "data" / "ILSVRC2012_validation_ground_truth.txt" if path.is_dir() else path
    meta = gt.parent / "meta.mat"
    for f in (gt, meta):
        if not f.is_file():
            raise LayoutError(f"--val-labels {path}: no {f} (the devkit's data/ folder holds both the "
                              "ground truth and meta.mat)")
    try:
        synsets = load_mat(meta).get("synsets")
    except MatFileError as e:
        raise LayoutError(f"--val-labels {path}: {e}") from None
    if not isinstance(synsets, list):
        raise LayoutError(f"--val-labels {path}: {meta} has no 'synsets' struct array")
    by_id = {}
    for s in synsets:
        try:
            by_id[int(np.asarray(s["ILSVRC2012_ID"]).ravel()[0])] = str(s["WNID"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise LayoutError(f"--val-labels {path}: {meta}: a synset without ILSVRC2012_ID / WNID") from None
    for n, line in enumerate(gt.read_text().splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if not text.isdigit() or int(text) not in by_id:
            raise LayoutError(f"--val-labels {gt} line {n}: {text[:20]!r} is not an ILSVRC2012_ID of {meta}")
        yield n, f"ILSVRC2012_val_{n:08d}", by_id[int(text)]


__all__ = ["read_classes", "list_flat_folder", "devkit_lines", "LayoutError"]
