"""`ldae-fast eval --protocols finetune` on shards goes through the streaming fine-tune
(eval/finetune_run.py): image and clip checkpoints, resume on rerun, the Kinetics recipe for a
video checkpoint, and one-line errors with the README's exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from eval_shards import write_split
from test_finetune_stream import _write_clip_split

from ldae_fast.config import build_config
from ldae_fast.errors import UsageError
from ldae_fast.eval import driver
from ldae_fast.eval.finetune import FinetuneRecipe, recipe_for_method
from ldae_fast.eval.finetune_run import finetune_readers
from ldae_fast.eval.finetune_stream import check_batch, micro_batches
from ldae_fast.eval.finetune_video import ClipClassifier
from ldae_fast.methods.diffmae.finetune import DIFFMAE_FINETUNE

TINY = {"model.width": "32", "model.num_heads": "2", "model.encoder_depth": "2", "model.decoder_depth": "1",
        "model.decoder_heads": "2", "data.img_size": "16", "data.batch_size": "4", "data.synthetic_images": "32",
        "engine.kernels": "reference", "engine.steps": "1", "engine.progress": "false", "eval.probe": "false",
        "eval.figure": "false"}


def _checkpoint(tmp_path, preset, **over):
    from ldae_fast.engine import loop

    cfg = build_config(preset, {**TINY, **over, "engine.out_dir": str(tmp_path / preset)})
    return str(loop.train(cfg).checkpoint)


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    write_split(root, "train", 2, 16, size=20, seed=0)
    write_split(root, "val", 1, 12, size=20, seed=1)
    return root


def _eval(ckpt, data, out, *extra):
    return driver.main(["--checkpoint", ckpt, "--data", str(data), "--protocols", "finetune",
                        "--finetune-steps", "2", "--finetune-batch-size", "8", "--micro-batch", "4",
                        "--num-workers", "0", "--out", str(out), *extra])


def test_image_checkpoint_fine_tunes_from_shards_and_a_rerun_resumes(tmp_path, image_shards):
    ckpt = _checkpoint(tmp_path, "diffmae-demo")
    assert _eval(ckpt, image_shards, tmp_path / "e1") == 0
    got = json.loads((tmp_path / "e1" / "eval.json").read_text())
    assert "finetune" in got["streamed"]
    rows = {(r["protocol"], r["encoder"]): r for r in got["rows"]}
    for enc in ("checkpoint", "random init"):
        r = rows[("finetune", enc)]
        # Default readers: 4 (shares of 2, even for MixUp); micro-batches of 4 = 2 readers' shares.
        assert (r["steps"], r["batch_size"], r["micro_batch"], r["accumulation"], r["resumed_from"]) == (2, 8, 4, 2, 0)
        assert ("finetune (EMA 0.9999)", enc) in rows
    assert got["val_images"] == 12
    # The same command again finds both runs' final checkpoints: nothing to train, same numbers.
    assert _eval(ckpt, image_shards, tmp_path / "e1") == 0
    again = {(r["protocol"], r["encoder"]): r for r in json.loads((tmp_path / "e1" / "eval.json").read_text())["rows"]}
    for key, r in rows.items():
        assert again[key]["resumed_from"] == 2 and again[key]["top1"] == r["top1"]
    # --finetune-steps only cuts the schedule short: a longer rerun continues from step 2, a
    # shorter one is refused (resume mismatch, 7).
    assert _eval(ckpt, image_shards, tmp_path / "e1", "--finetune-steps", "3", "--no-baseline") == 0
    row = next(r for r in json.loads((tmp_path / "e1" / "eval.json").read_text())["rows"])
    assert row["resumed_from"] == 2 and row["steps"] == 3
    assert _eval(ckpt, image_shards, tmp_path / "e1", "--finetune-steps", "1", "--no-baseline") == 7


def test_video_checkpoint_fine_tunes_on_clip_shards_with_the_kinetics_recipe(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, "diffmae-video-demo", **{"data.num_frames": "4"})
    root = tmp_path / "clips"
    root.mkdir()
    _write_clip_split(root, "train", 2, 8, seed=3)
    _write_clip_split(root, "val", 1, 6, seed=4)
    assert _eval(ckpt, root, tmp_path / "ev", "--no-baseline") == 0
    out = capsys.readouterr().out
    assert "diffmae video size L" in out and "dropout 0.5, repeated aug 2" in out
    got = json.loads((tmp_path / "ev" / "eval.json").read_text())
    r = next(r for r in got["rows"] if r["protocol"] == "finetune")
    assert r["layer_decay"] == 0.75 and r["steps"] == 2 and r["recipe"].startswith("diffmae video size L")
    # lr = blr x batch / 256 with the column's blr 3.2e-3.
    assert r["lr"] == pytest.approx(3.2e-3 * 8 / 256)


def test_the_kinetics_column_is_the_supplements():
    enc = build_config("diffmae-demo")  # any object: the table does not read the encoder
    r, note = recipe_for_method("diffmae", "L", 24, enc, video=True)
    assert (r.batch_size, r.blr, r.layer_decay, r.drop_path, r.dropout, r.repeated_aug, r.epochs) == (
        128, 3.2e-3, 0.75, 0.2, 0.5, 2, 50) and note.startswith("diffmae video size L")
    # The rest is the image columns' (AdamW betas, wd, warm-up, RandAug, mixup, cutmix, smoothing).
    same = {k: v for k, v in DIFFMAE_FINETUNE["L"].items()
            if k not in ("batch_size", "blr", "layer_decay", "drop_path", "epochs")}
    assert all(getattr(r, k) == v for k, v in same.items())
    with pytest.raises(ValueError, match="no fine-tuning recipe for clip encoders"):
        recipe_for_method("ldae", "L", 24, enc, video=True)
    assert FinetuneRecipe().dropout == 0.0 and FinetuneRecipe().repeated_aug == 1


def test_clip_classifier_layer_decay_groups():
    from timm.optim import param_groups_layer_decay

    from ldae_fast.methods import build_model

    cfg = build_config("diffmae-video-demo", {**TINY, "data.num_frames": "4"})
    enc = build_model(cfg).encoder
    m = ClipClassifier(enc, 5, drop_path=0.2, dropout=0.5)
    groups = param_groups_layer_decay(m, weight_decay=0.05, no_weight_decay_list=m.no_weight_decay(),
                                      layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    L = len(enc.blocks)
    # As timm's ViT: stem 0, block i at i + 1 (the encoder's norm with the last block), the fresh
    # norm and the head L + 1; scale 0.5^(L + 1 - id).
    assert scale[id(named["encoder.patch_embed.proj.weight"])] == 0.5 ** (L + 1)
    assert scale[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.5 ** L
    assert scale[id(named["encoder.norm.weight"])] == scale[id(named["encoder.blocks.1.norm1.weight"])] == 0.5
    assert scale[id(named["head.weight"])] == 1.0
    assert wd[id(named["encoder.cls_token"])] == 0 and wd[id(named["head.weight"])] == 0.05
    # Drop path rises to 0.2 at the last block, none in the first.
    assert m.encoder.blocks[-1].attn.drop.drop_prob == pytest.approx(0.2)
    assert not hasattr(m.encoder.blocks[0].attn, "drop")
    x = torch.randint(0, 255, (2, 3, 4, 16, 16), dtype=torch.uint8).float()
    assert m.eval()(x).shape == (2, 5)


def test_readers_default_divides_the_batch():
    assert finetune_readers(1024, 1, 1, 0, None) == 16
    assert finetune_readers(1024, 1, 8, 8, None) == 64
    assert finetune_readers(128, 2, 8, 1, None) == 16
    assert finetune_readers(8, 1, 1, 0, None) == 8
    assert finetune_readers(8, 1, 1, 0, None, even=True) == 4
    assert finetune_readers(12, 2, 1, 0, None) == 6
    assert finetune_readers(12, 2, 1, 0, None, even=True) == 3
    assert finetune_readers(24, 1, 1, 0, 3) == 3
    # No multiple of 8 x 10 divides 1024: the most readers up to 80 over the 8 ranks alone.
    assert finetune_readers(1024, 1, 8, 10, None) == 64
    with pytest.raises(UsageError, match="multiple of the 8 rank"):
        finetune_readers(100, 1, 8, 1, None)


def test_micro_batches_are_runs_of_readers_or_pieces_of_one():
    # A rank hosting readers 4..7 with shares of 4: micro 8 takes two readers' shares at a time.
    assert micro_batches([4, 5, 6, 7], 4, 8) == [(4, 0, 0, 8), (6, 0, 8, 16)]
    # micro 3 cuts each share into pieces 3 + 1.
    assert micro_batches([4, 5], 4, 3) == [(4, 0, 0, 3), (4, 1, 3, 4), (5, 0, 4, 7), (5, 1, 7, 8)]
    with pytest.raises(UsageError, match="--micro-batch 6"):
        check_batch(16, 8, 2, 6, 1, False)  # 3 readers' shares of 2 per micro-batch, 4 readers per rank
    with pytest.raises(UsageError, match="even"):
        check_batch(16, 4, 1, 3, 1, True)
    assert check_batch(16, 4, 2, 8, 1, True) == 4
    # Larger than a rank's part of the batch (8 of 16 on 2 ranks): cut to it.
    assert check_batch(16, 4, 2, 256, 1, True) == 4
    assert micro_batches([2, 3], 4, 256) == [(2, 0, 0, 8)]


def test_errors_are_one_line_with_the_readmes_codes(tmp_path, image_shards, capsys):
    vid = _checkpoint(tmp_path, "diffmae-video-demo", **{"data.num_frames": "4"})
    # A video encoder with synthetic data: the fine-tune reads clip shards (usage, 2).
    assert driver.main(["--checkpoint", vid, "--protocols", "finetune", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "clip shards" in err
    # Image protocols on a video encoder (usage, 2).
    assert driver.main(["--checkpoint", vid, "--protocols", "linear", "--out", str(tmp_path / "x")]) == 2
    assert "finetune and figure" in capsys.readouterr().err
    img = _checkpoint(tmp_path, "diffmae-demo")
    # A global batch the readers cannot split (usage, 2), named by its flag.
    assert _eval(img, image_shards, tmp_path / "y", "--readers", "3", "--no-baseline") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--finetune-batch-size 8" in err and "--readers=3" in err
    # Missing shards (data, 5).
    assert _eval(img, tmp_path / "nowhere" / "train-{000000..000001}.tar", tmp_path / "z", "--val-data",
                 str(tmp_path / "nowhere" / "val-000000.tar"), "--no-baseline") == 5
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
