"""The tiny run the method tests build on: a width-32, one-block encoder and decoder on 16 px
inputs, a few images, reference kernels, a log line every step and no figure, so one training
step takes well under a second on a CPU. Shared by the DiffMAE image and video tests."""

from __future__ import annotations

from ldae_fast.config import Config, build_config

TINY_NET = {
    "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
    "model.decoder_heads": "2", "data.img_size": "16", "data.batch_size": "4", "data.synthetic_images": "32",
    "engine.kernels": "reference", "engine.log_every": "1", "engine.progress": "false", "eval.figure": "false",
}


def tiny_config(preset: str, base: dict[str, str], tmp_path=None, **over) -> Config:
    """`preset` with the overrides `base` (TINY_NET and a test file's own), then `over` (any
    values, as strings); with `tmp_path` the run writes under tmp_path/run."""
    o = {**base, **{k: str(v) for k, v in over.items()}}
    if tmp_path is not None:
        o["engine.out_dir"] = str(tmp_path / "run")
    return build_config(preset, o)
