"""Data: WebDataset streaming, shard writer, decode/augment, the built-in synthetic set.

Modules by job: urls (shard URLs, opening them), tar (the tar reader, samples, labels), shuffle
(shard order, shuffle buffer), sources (the worker datasets), stream (the resumable training
stream), eval_arrays (labelled splits for evaluation), resident (the in-memory set), transforms,
synthetic, shards (the writer), badsamples.

Entry points for the rest of the package:
- `build_train_stream(cfg, rank, world_size)` -> `TrainStream`, endless normalised batches with
  `state_dict()` / `load_state_dict()` (resume rule: ldae_fast/data/stream.py docstring);
- `build_eval_arrays(cfg, split, max_images)` -> (images, labels) for probes, kNN, figures;
- `normalize` / `denormalize` with the ImageNet mean and std;
- `write_shards` and the `ldae-fast make-shards` CLI (`shards.main`).
"""

from ..lazy import lazy_exports

# name -> submodule. Imported on first use (PEP 562), so `ldae-fast make-shards --help` and the
# light modules (urls, shards) do not pay for torch.
_EXPORTS = {
    **dict.fromkeys(("BadSampleCounter", "DataError"), "badsamples"),
    "build_eval_arrays": "eval_arrays",
    "write_shards": "shards",
    **dict.fromkeys(("TrainStream", "build_train_stream"), "stream"),
    **dict.fromkeys(("make_synthetic", "synthetic_split", "synthetic_val_size"), "synthetic"),
    **dict.fromkeys(("IMAGENET_MEAN", "IMAGENET_STD", "crop_resize_flip", "denormalize", "eval_resize_size",
                     "eval_transform", "normalize", "random_resized_crop_batch", "random_resized_crop_tensor",
                     "sample_crop_box", "sample_crop_flip", "to_rgb", "train_transform"), "transforms"),
    "expand_urls": "urls",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "normalize", "denormalize", "to_rgb", "train_transform",
    "eval_transform", "eval_resize_size", "sample_crop_box", "crop_resize_flip",
    "random_resized_crop_tensor", "random_resized_crop_batch", "sample_crop_flip",
    "make_synthetic", "synthetic_split", "synthetic_val_size",
    "TrainStream", "build_train_stream", "build_eval_arrays", "expand_urls", "write_shards",
    "DataError", "BadSampleCounter",
]
