"""Run configuration: nested dataclasses, named presets, `--section.field=value` overrides.

This module holds the mechanism and the shared sections; a method's own sections (l-DAE's `noise`,
methods/ldae/config.py) and its presets live with the method, which registers them into the
mechanism (config_registry.py): this module never imports a method, and a config built before
`ldae_fast.methods` is imported fails with RegistryNotLoaded. A section stores what the user set; a field that follows others (`Derived`) is
derived on every read, never written back.

Every field has a default that runs; every section validates itself in `__post_init__` and the
whole config checks the relations between sections in `Config.validate()`, so a bad value fails
before any work starts, with a message that names the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config_registry as _registry
from .config_registry import RegistryNotLoaded  # noqa: F401 (callers catch it here)
from .errors import UserError
from .shard_urls import SHARD_FIELDS, sanitize_stored_config, untrusted_shard_fields  # noqa: F401 (loaders import it here)
from .tokenizer_kinds import KINDS as TOKENIZER_KINDS


class ConfigError(ValueError, UserError):
    """A configuration value is invalid; the message says which and what is allowed."""

    exit_code = 2
    category = "config error"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _registered(table: dict[str, Any]) -> dict[str, Any]:
    """A registry table (config_registry.py), once the layers above have filled it."""
    _registry.require_loaded()
    return table


class Derived:
    """A field that stores what the user set and reads as what follows from the rest of the
    config while it is unset (at its default): derived on every read, never written back, so a
    saved config replayed with another `model.size` or `data.crop` is what a fresh run with
    those values is. `read(section, stored)` gives the value a reader sees."""

    def __init__(self, default: Any, read: Any) -> None:
        self.default, self.read = default, read

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self.default  # the dataclass default
        return self.read(obj, obj.__dict__.get(self.name, self.default))

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value


def stored(section: Any, name: str) -> Any:
    """What a section stores for field `name` (for a Derived field, what the user set)."""
    return section.__dict__[name]


def _from_size(key: str) -> Derived:
    return Derived(0, lambda m, v: v or MODEL_SIZES[m.size][key])


def _from_run(key: str) -> Derived:
    """A model field that follows another section (model.latent_dim, num_classes, num_frames):
    the run's Config tells it once it is built (Config.__post_init__)."""
    return Derived(0, lambda m, v: v or (m._run_value(key) if m.__dict__.get("_run") else 0))


# torch.compile's modes; inductor records CUDA graphs in two of them.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

# Sizes of the paper (encoder / decoder of the same width) plus small ones for CPU and Tiny ImageNet.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(width=96, encoder_depth=3, decoder_depth=3, num_heads=3),
    "S": dict(width=384, encoder_depth=12, decoder_depth=12, num_heads=6),
    "B": dict(width=768, encoder_depth=12, decoder_depth=12, num_heads=12),
    # "ViT-1/2L": the two halves of DiT-L, the paper's default.
    "halfL": dict(width=1024, encoder_depth=12, decoder_depth=12, num_heads=16),
    "L": dict(width=1024, encoder_depth=24, decoder_depth=24, num_heads=16),
    # ViT-H/14's encoder (DiffMAE's largest); its presets set their own decoder.
    "H": dict(width=1280, encoder_depth=32, decoder_depth=32, num_heads=16),
}
# kernels.attention.BACKENDS (the config layer does not import the kernels; a test keeps them equal).
ATTN_BACKENDS = ("auto", "sdpa", "xformers", "math", "flash", "cudnn", "efficient")


@dataclass
class ModelConfig:
    size: str = "tiny"
    """Named size (tiny, S, B, halfL, L); width/depths/heads left at 0 read as this size's (derived
    on every read, never stored, so a saved config replayed with another size takes its dims)."""
    width: int = _from_size("width")
    """Transformer width of encoder and decoder (0: from `size`)."""
    encoder_depth: int = _from_size("encoder_depth")
    """Encoder blocks (0: from `size`)."""
    decoder_depth: int = _from_size("decoder_depth")
    """Decoder blocks (0: from `size`)."""
    num_heads: int = _from_size("num_heads")
    """Attention heads (0: from `size`)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / width."""
    patch_size: int = 4
    """Patch size p of both the model and the PCA tokenizer."""
    num_classes: int = _from_run("num_classes")
    """Classes of the label embedding of a class-conditioned network (l-DAE's ldae.class_cond; 0:
    data.num_classes, or data.synthetic_classes)."""
    latent_dim: int = _from_run("latent_dim")
    """d of a network fed or returning latent tokens (l-DAE's ldae.input / ldae.output; 0:
    tokenizer.latent_dim, read through the run's config)."""
    attn_backend: str = "auto"
    """Attention: 'auto' (fastest present), 'sdpa', 'xformers', 'math' (the reference), or SDPA
    pinned to one kernel: 'flash', 'cudnn' (CUDA only), 'efficient' (CUDA only)."""
    grad_checkpointing: bool = False
    """Recompute each block in the backward pass (less memory, ~30% more compute)."""
    fused_adaln: bool = False
    """adaLN blocks: LayerNorm + modulate as one Triton kernel (forward and backward) where
    engine.kernels resolves to triton (CUDA; CPU under TRITON_INTERPRET=1 with engine.kernels=triton);
    elsewhere, engine.kernels=reference included, the plain PyTorch ops. Off by default until a GPU
    run of bench/train_step.py (variant d+adaln) shows it helps."""
    decoder_width: int = Derived(0, lambda m, v: v or m.width)
    """DiffMAE decoder width (0: model.width)."""
    decoder_heads: int = Derived(0, lambda m, v: v or m.num_heads)
    """DiffMAE decoder attention heads (0: model.num_heads)."""
    num_frames: int = _from_run("num_frames")
    """Frames of a clip the network is built for (0: data.num_frames, read through the run's config)."""
    bf16_residual: bool = False
    """Speed switch (off until a GPU run shows it helps; docs/speed.md): under bf16 autocast the
    residual stream between blocks is bfloat16 instead of float32; LayerNorm statistics and the
    loss stay float32. No effect without autocast."""
    adaln_act_dtype: bool = False
    """Speed switch (needs model.fused_adaln): under autocast the fused adaLN LayerNorm kernel writes
    its output in the autocast dtype, what the next Linear reads, with no float32 round trip."""
    fp8: str = ""
    """Speed switch, optional extra: '' (off), 'rowwise' or 'tensorwise': torchao's float8 training
    for the blocks' attention projections and MLPs. Needs torchao and a GPU with FP8 (sm_89+)."""

    def __post_init__(self) -> None:
        _one_of("model.size", self.size, tuple(MODEL_SIZES))
        _one_of("model.attn_backend", self.attn_backend, ATTN_BACKENDS)
        _check(self.patch_size >= 1, f"model.patch_size={self.patch_size} must be >= 1")
        _check(self.width >= 1 and self.encoder_depth >= 1 and self.decoder_depth >= 1,
               "model.width, model.encoder_depth and model.decoder_depth must be >= 1")
        _check(self.num_heads >= 1 and self.width % self.num_heads == 0,
               f"model.width={self.width} must be divisible by model.num_heads={self.num_heads}")
        _check(self.mlp_ratio > 0, f"model.mlp_ratio={self.mlp_ratio} must be > 0")
        _check(self.num_frames >= 0, f"model.num_frames={self.num_frames} must be >= 0")
        _check(self.decoder_heads >= 1 and self.decoder_width % self.decoder_heads == 0,
               f"model.decoder_width={self.decoder_width} must be divisible by "
               f"model.decoder_heads={self.decoder_heads}")
        _check(self.num_classes >= 0, f"model.num_classes={self.num_classes} must be >= 0")
        _one_of("model.fp8", self.fp8, ("", "rowwise", "tensorwise"))
        _check(not self.adaln_act_dtype or self.fused_adaln,
               "model.adaln_act_dtype sets the fused adaLN kernel's output dtype: set model.fused_adaln=true too")

    def _run_value(self, key: str) -> int:
        """A value this section takes from the rest of the run's config (Config.__post_init__
        links it): 0 when that config does not give one."""
        run = self.__dict__["_run"]
        if key == "num_frames":
            return run.data.num_frames
        # latent_dim and num_classes are read only by a network that asks for them (MethodSpec.model_links).
        spec = _registry.METHODS.get(run.objective.method)
        if spec is None or key not in spec.model_links(run):
            return 0
        if key == "latent_dim":
            return run.tokenizer.latent_dim
        return run.data.synthetic_classes if run.data.source == "synthetic" else run.data.num_classes



@dataclass
class TokenizerConfig:
    kind: str = "pca"
    """'pca' (patch-wise PCA, the paper's final tokenizer), 'pixel' (identity basis, d = 3p^2),
    'patch-ae' / 'patch-vae' (linear d x D encoder and decoder fitted by gradient descent, the
    VAE with a KL term) or 'conv-vae' (a small convolutional KL-VAE, stride 8): l-DAE Table 2."""
    latent_dim: int = 16
    """d: latent dimension per patch the noise is added in (1..3p^2); for conv-vae d = c (p/8)^2
    with c its latent channels (p a multiple of 8)."""
    path: str = ""
    """A saved tokenizer (.safetensors, any kind: its metadata names it) to load; empty: fit one
    at the start of the run."""
    fit_images: int = 2048
    """Images the tokenizer is fitted on (streamed through PCA's covariance; held as patches or
    images for the learned kinds)."""
    fit_patches: int = 131072
    """patch-ae / patch-vae: most patches kept for the fit (drawn evenly from every image)."""
    fit_steps: int = 2000
    """patch-ae / patch-vae: Adam steps of the fit."""
    fit_batch: int = 1024
    """patch-ae / patch-vae: patches per step."""
    fit_lr: float = 1e-2
    """patch-ae / patch-vae: peak Adam learning rate (5% warm-up, then cosine to 0)."""
    beta: float = 0.01
    """patch-vae / conv-vae: KL weight; loss = summed squared error + beta KL (a Gaussian decoder
    of variance beta/2)."""
    conv_steps: int = 300
    """conv-vae: Adam steps of the fit."""
    conv_batch: int = 32
    """conv-vae: images per step."""
    conv_lr: float = 1e-3
    """conv-vae: peak Adam learning rate (5% warm-up, then cosine to 0)."""
    conv_width: int = 32
    """conv-vae: channels of its first convolution (2x after the first downsampling)."""
    adversarial: bool = False
    """conv-vae: add the adversarial term of a patch discriminator trained from scratch (over the
    fit's second half), in place of the paper's VQGAN's (docs/tokenizers.md)."""
    adv_weight: float = 0.1
    """conv-vae: weight of that term (per-pixel loss units) when tokenizer.adversarial is on."""

    def __post_init__(self) -> None:
        _one_of("tokenizer.kind", self.kind, TOKENIZER_KINDS)
        _check(self.latent_dim >= 1, f"tokenizer.latent_dim={self.latent_dim} must be >= 1")
        for name in ("fit_images", "fit_patches", "fit_steps", "fit_batch", "conv_steps", "conv_batch",
                     "conv_width"):
            _check(getattr(self, name) >= 1, f"tokenizer.{name}={getattr(self, name)} must be >= 1")
        for name in ("fit_lr", "conv_lr"):
            v = getattr(self, name)
            _check(math.isfinite(v) and v > 0, f"tokenizer.{name}={v} must be > 0")
        for name in ("beta", "adv_weight"):
            v = getattr(self, name)
            _check(math.isfinite(v) and v >= 0, f"tokenizer.{name}={v} must be >= 0")


@dataclass
class ObjectiveConfig:
    method: str = "ldae"
    """The method trained: a name in the methods registry (ldae_fast/methods/__init__.py); its own
    fields live in its own sections (MethodSpec.sections: `--SECTION.field=value`)."""


# data.synthetic_kind values that are clips (data/video.py), not images.
SYNTHETIC_CLIP_KINDS = ("moving-shapes",)


@dataclass
class DataConfig:
    source: str = "synthetic"
    """'synthetic' (built in, no download), 'wds' (WebDataset shards in the ImageNet layout,
    decoded as they stream) or 'resident' (the same shards decoded once into a uint8 array held
    on the training device, cropped and flipped there; for sets that fit in device memory: see
    ldae_fast/data/resident.py), or 'wds-video' (WebDataset shards of clips, KEY.frames.npy:
    ldae_fast/data/video.py)."""
    train_shards: str = ""
    """Shard URLs for training: path, brace pattern (train-{000000..000009}.tar.gz) or pipe: URL."""
    val_shards: str = ""
    """Shard URLs for evaluation (linear probe / kNN)."""
    img_size: int = 32
    """Side of the square training crop."""
    batch_size: int = 64
    """Micro-batch per device."""
    epoch_size: int = 0
    """Samples (images, or clips for video) in one pass over the data (0: the synthetic set's size;
    required for shards)."""
    num_workers: int = 0
    """DataLoader workers (0: decode in the main process)."""
    shuffle_buffer: int = 2000
    """WebDataset sample shuffle buffer, per worker; it holds stored samples (for clips:
    shuffle_buffer x workers x clip bytes per rank)."""
    resampled: bool = False
    """Draw shards with replacement, an endless stream (resume is keyed on the step)."""
    crop_min_scale: float = Derived(0.2, lambda d, v: 1.0 if d.crop == "center" else v)
    """Smallest area fraction of RandomResizedCrop."""
    hflip: bool = Derived(True, lambda d, v: False if d.crop == "center" else v)
    """Random horizontal flip."""
    crop: str = "random_resized"
    """Training crop: 'random_resized' (RandomResizedCrop from crop_min_scale, flip per hflip) or
    'center' (the largest centred square, no flip: no augmentation, as every row of the l-DAE
    trajectory before its last; crop_min_scale then reads 1 and hflip false, whatever they store)."""
    max_bad_fraction: float = 0.01
    """Stop when more than this fraction of samples is corrupt (after the first 100)."""
    synthetic_images: int = 2048
    """Size of the built-in synthetic dataset."""
    synthetic_classes: int = 8
    """Classes of the built-in synthetic dataset."""
    synthetic_kind: str = "shapes"
    """What the synthetic classes are: 'shapes' (shape kind x texture on clutter) or 'layouts'
    (three identical dots whose arrangement is the class: spatial structure, not colour or parts;
    see data/synthetic.py), 'gratings', or 'moving-shapes' (clips of data.num_frames frames:
    shapes moving at constant velocity and bouncing off the borders, data/video.py)."""
    num_frames: int = 0
    """Frames per training clip (0: images). Video needs objective.method=diffmae and
    data.source 'wds-video' or synthetic_kind 'moving-shapes'; batches are (B, C, T, H, W)."""
    frame_stride: int = 1
    """'wds-video': take every frame_stride-th frame of a stored clip (a random window)."""
    repeated_aug: int = 1
    """Repeated augmentation (video sources only): each clip yields this many differently
    cropped samples in one batch; data.batch_size counts samples and must be a multiple of it."""
    gpu_decode: bool = False
    """Decode JPEGs on the GPU (torchvision.io.decode_jpeg) when CUDA is present."""
    cache_dir: str = ""
    """'resident': where the decoded array is cached ('' : $XDG_CACHE_HOME/ldae-fast/resident,
    else ~/.cache/ldae-fast/resident)."""
    resident_decode_size: int = 0
    """'resident': side the images are decoded to (resize shorter side + centre crop) before
    they are held in memory; the crops are drawn from these (0: data.img_size)."""
    class_subset: int = 0
    """'resident': keep only classes 0..K-1 of train and val (0: all classes)."""
    num_classes: int = 0
    """Classes of the labelled shards (0: unknown); a .cls label outside 0..num_classes-1 is a
    bad sample (negative or non-integer labels always are)."""
    max_image_pixels: int = 64_000_000
    """Largest image (width x height) decoded; a larger one is a counted bad sample, refused
    from its header before any decode (PIL's own bomb warning starts near 89 MP)."""

    def __post_init__(self) -> None:
        sources = _registered(_registry.SOURCES)
        _one_of("data.source", self.source, tuple(sources))
        _one_of("data.crop", self.crop, ("random_resized", "center"))
        _check(self.img_size >= 1, f"data.img_size={self.img_size} must be >= 1")
        _check(self.batch_size >= 1, f"data.batch_size={self.batch_size} must be >= 1")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(0 < self.crop_min_scale <= 1, f"data.crop_min_scale={self.crop_min_scale} must be in (0, 1]")
        _check(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction must be in [0, 1]")
        _check(self.synthetic_images >= 1 and self.synthetic_classes >= 2,
               "data.synthetic_images must be >= 1 and data.synthetic_classes >= 2")
        _one_of("data.synthetic_kind", self.synthetic_kind, ("shapes", "layouts", "gratings", *SYNTHETIC_CLIP_KINDS))
        src = sources[self.source]
        # A source of both (the synthetic set) yields clips for its clip kinds only.
        video = src.video and (not src.images or self.synthetic_kind in SYNTHETIC_CLIP_KINDS)
        clip_sources = " or ".join(f"data.source={k!r}" for k, v in sources.items() if v.video and not v.images)
        _check(video == (self.num_frames > 0),
               f"data.num_frames={self.num_frames}: clips (num_frames >= 1) go with {clip_sources} "
               f"or data.synthetic_kind={' or '.join(map(repr, SYNTHETIC_CLIP_KINDS))}, images (0) with the others "
               f"(data.source={self.source!r}, data.synthetic_kind={self.synthetic_kind!r})")
        _check(self.frame_stride >= 1, f"data.frame_stride={self.frame_stride} must be >= 1")
        _check(self.repeated_aug >= 1, f"data.repeated_aug={self.repeated_aug} must be >= 1")
        _check(self.repeated_aug == 1 or video,
               f"data.repeated_aug={self.repeated_aug} is implemented for the video sources only "
               f"(data.source={self.source!r}); set it to 1")
        _check(self.batch_size % self.repeated_aug == 0,
               f"data.batch_size={self.batch_size} is not a multiple of data.repeated_aug={self.repeated_aug}")
        _check(self.resident_decode_size >= 0,
               f"data.resident_decode_size={self.resident_decode_size} must be >= 0")
        _check(self.class_subset == 0 or self.class_subset >= 2,
               f"data.class_subset={self.class_subset} must be 0 (all classes) or >= 2")
        _check(self.num_classes >= 0, f"data.num_classes={self.num_classes} must be >= 0")
        _check(self.max_image_pixels >= 1, f"data.max_image_pixels={self.max_image_pixels} must be >= 1")


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: 'adamw' (fused on CUDA) or 'lamb' (layer-wise trust ratio, for large global
    batches: timm's Lamb on one device, DeepSpeed's FusedLamb under engine.backend=deepspeed)."""
    blr: float = 1e-4
    """Base learning rate; lr = blr * global batch / 256 unless `lr` is set."""
    lr: float = 0.0
    """Absolute learning rate (0: derived from blr)."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for AdamW; the paper uses none)."""
    beta1: float = 0.9
    """beta1 of AdamW / LAMB."""
    beta2: float = 0.95
    """beta2 of AdamW / LAMB."""
    warmup_epochs: float = 1.0
    """Linear warm-up length in epochs, then half-cycle cosine to min_lr."""
    min_lr: float = 0.0
    """Final learning rate of the cosine."""
    clip_grad: float = 3.0
    """Clip the global gradient norm to this (0: no clipping)."""
    ema_decay: float = 0.9999
    """Decay of the parameter EMA kept beside the model (0: no EMA)."""

    def __post_init__(self) -> None:
        _one_of("optim.name", self.name, ("adamw", "lamb"))
        _check(self.blr > 0 or self.lr > 0, "optim.blr or optim.lr must be > 0")
        _check(self.lr >= 0 and self.weight_decay >= 0 and self.min_lr >= 0, "optim values must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2 must be in [0, 1)")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
        _check(self.clip_grad >= 0, "optim.clip_grad must be >= 0")
        _check(0 <= self.ema_decay < 1, "optim.ema_decay must be in [0, 1)")


_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([dhms])")


def parse_duration(text: str) -> float:
    """'3h50m', '90m', '1d2h', '45s', '5400' or '5400.5' (seconds) -> seconds; '' or '0' -> 0."""
    t = str(text).strip().lower().replace(" ", "")
    if not t:
        return 0.0
    try:
        v = float(t)
    except ValueError:
        pos, total = 0, 0.0
        for m in _DURATION.finditer(t):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t):
            raise ValueError(f"{text!r} is not a duration (seconds, or e.g. '3h50m', '90m', '1d2h')") from None
        return total
    if not 0 <= v < math.inf:
        raise ValueError(f"{text!r} must be a finite number of seconds >= 0")
    return v


@dataclass
class EngineConfig:
    backend: str = "single"
    """'single' (one device, no launcher), 'ddp' (torch DistributedDataParallel under torchrun: models
    that fit on one GPU) or 'deepspeed' (ZeRO 1-3: when optimizer state or weights must be sharded)."""
    device: str = "auto"
    """'auto' (cuda when present), 'cpu' or 'cuda'."""
    precision: str = "auto"
    """'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32' or 'bf16'."""
    kernels: str = "auto"
    """'auto' (Triton on CUDA, reference on CPU), 'triton' (also on CPU, interpreted), 'reference'."""
    epochs: float = 2.0
    """Length of the run in epochs (ignored when `steps` > 0)."""
    steps: int = 0
    """Length of the run in optimizer steps (0: from epochs)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 0
    """Seed of model init, data order and noise."""
    log_every: int = 10
    """Steps between metric lines (the loss is synced to the host only then)."""
    ckpt_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    ckpt_every_s: float = 0.0
    """Seconds between checkpoints besides ckpt_every (0: off), so a killed long run loses minutes
    of work whatever a step costs; under several ranks checked at log steps, on rank 0's clock."""
    ckpt_write_failures: int = 3
    """Consecutive periodic checkpoint writes that may fail (disk full, file size limit) before the
    run stops (exit 4); each failure is a warning and the next interval tries again. A failed
    final checkpoint always stops the run."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted."""
    out_dir: str = "runs/demo"
    """Run directory: config.json, metrics.jsonl, checkpoints/, figures."""
    resume: str = ""
    """'' (fresh run), 'auto' (newest complete checkpoint in out_dir, if any) or a path."""
    resume_rebatch: bool = False
    """Allow a resume whose global batch (data.batch_size x engine.grad_accum x ranks) differs from
    the checkpoint's: the step is re-derived from the images seen and the schedule is the new
    batch's (the log says so). Another split of the same global batch needs no flag."""
    compile: bool = False
    """torch.compile each transformer block on its own (regional compile; the kernels stay ops)."""
    compile_mode: str = "default"
    """torch.compile mode of the blocks: 'default', 'reduce-overhead' (CUDA graphs: static shapes,
    fewer launches, more memory), 'max-autotune' (autotuned kernels, CUDA graphs too) or
    'max-autotune-no-cudagraphs'. The CUDA-graph modes need engine.grad_accum = 1."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (for exact-resume checks)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (1, 2 or 3) when backend='deepspeed'."""
    deepspeed_config: str = ""
    """Extra DeepSpeed JSON whose keys override the generated config."""
    progress: bool = True
    """Progress bar when stdout is a terminal."""
    time_budget_s: float = 0.0
    """Stop after this many seconds of the step loop (0: no limit): the run ends at the first
    step past the budget, with its log line and final checkpoint as if that were the last step.
    The schedule is still the one of engine.steps / engine.epochs, so pick steps that fit."""
    stop_after: str = ""
    """Wall-clock limit of this process's run, in seconds or as a duration ('3h50m', '90m'; '' or 0:
    none), for schedulers that kill without a signal: the run stops at the last step it expects to
    end before the limit, writes a checkpoint and exits with code 10 ('preempted'), like on SIGTERM;
    `--engine.resume=auto` continues it. Leave room for the checkpoint write."""
    peak_tflops: float = 0.0
    """Per-device peak TFLOP/s for the logged MFU (0: the bf16 dense peak of a known GPU, looked
    up by name in engine/mfu.py; no MFU on CPU or an unknown GPU)."""
    overwrite: bool = False
    """A fresh run (no `resume`) into an out_dir that holds checkpoints deletes them first;
    without it such a run is refused, so an old run is never pruned into or resumed by mistake."""
    diverge_grad_norm: float = 1e6
    """Divergence guard: a logged (window-mean) gradient norm above this, or non-finite, counts
    as diverged (0: only a non-finite norm counts)."""
    diverge_checks: int = 3
    """Stop the run after this many consecutive diverged log lines (0: never stop)."""
    ckpt_consolidated: bool = True
    """DeepSpeed checkpoints also hold the whole model and AdamW state in the single-device format
    (gathered to rank 0's CPU memory at each checkpoint), so they resume on another rank count,
    ZeRO stage or backend; false keeps only DeepSpeed's sharded files (for models whose optimizer
    state does not fit one host's memory), which resume with DeepSpeed on the same rank count."""

    def __post_init__(self) -> None:
        _one_of("engine.backend", self.backend, ("single", "ddp", "deepspeed"))
        _one_of("engine.device", self.device, ("auto", "cpu", "cuda"))
        _one_of("engine.precision", self.precision, ("auto", "fp32", "bf16"))
        _one_of("engine.kernels", self.kernels, ("auto", "triton", "reference"))
        _one_of("engine.compile_mode", self.compile_mode, COMPILE_MODES)
        # A replay overwrites the previous micro-batch's graph outputs, among them the gradients
        # autograd accumulates into: untested and reported to fail, so refused up front.
        _check(not (self.compile and self.compile_mode in CUDA_GRAPH_MODES and self.grad_accum > 1),
               f"engine.compile_mode={self.compile_mode!r} records CUDA graphs, which this trainer does "
               f"not combine with engine.grad_accum={self.grad_accum}; use 'max-autotune-no-cudagraphs' "
               "or 'default', or grad_accum=1")
        _check(self.epochs > 0 or self.steps > 0, "engine.epochs or engine.steps must be > 0")
        _check(self.steps >= 0 and self.grad_accum >= 1, "engine.steps >= 0, engine.grad_accum >= 1")
        _check(self.log_every >= 1 and self.ckpt_every >= 0 and self.keep_last >= 1,
               "engine.log_every >= 1, engine.ckpt_every >= 0, engine.keep_last >= 1")
        _check(self.ckpt_every_s >= 0 and self.ckpt_write_failures >= 1,
               f"engine.ckpt_every_s={self.ckpt_every_s} must be >= 0 and "
               f"engine.ckpt_write_failures={self.ckpt_write_failures} >= 1")
        _check(self.zero_stage in (1, 2, 3), f"engine.zero_stage={self.zero_stage} must be 1, 2 or 3")
        _check(self.peak_tflops >= 0, f"engine.peak_tflops={self.peak_tflops} must be >= 0")
        _check(self.time_budget_s >= 0, f"engine.time_budget_s={self.time_budget_s} must be >= 0")
        try:
            parse_duration(self.stop_after)
        except ValueError as e:
            raise ConfigError(f"engine.stop_after: {e}") from None
        _check(self.diverge_grad_norm >= 0, f"engine.diverge_grad_norm={self.diverge_grad_norm} must be >= 0")
        _check(self.diverge_checks >= 0, f"engine.diverge_checks={self.diverge_checks} must be >= 0")


@dataclass
class EvalConfig:
    probe: bool = True
    """Run the quick linear probe (and kNN) at the end of training: demo presets and synthetic data
    only; other runs print the `ldae-fast eval` line that evaluates them."""
    probe_epochs: int = 90
    """Linear-probe epochs (MAE protocol: 90)."""
    probe_blr: float = 0.1
    """Linear-probe base lr (LARS), lr = blr * batch / 256. The one probe-lr flag. l-DAE App. A
    prints "lr 6.4e-3" at batch 16384, while MAE's protocol it follows (blr 0.1 at that batch)
    gives 6.4: the paper presets keep MAE's blr 0.1 (lr 6.4); pass 1e-4 for the printed 6.4e-3."""
    probe_batch_size: int = 256
    """Linear-probe batch size."""
    knn_k: str = "20,200"
    """Neighbour counts of the kNN classifier."""
    figure: bool = True
    """Write the method's figure at the end of training (demo presets and synthetic data, as
    eval.probe)."""
    figure_sigmas: str = "0.2,0.6,1.0,1.4"
    """Noise levels (sigma) of the figure's columns."""
    probe_t: int = 10
    """Noise step t the encoder is conditioned on for the probe and kNN, of the method's noise
    schedule (MethodSpec.probe_sigma: l-DAE's noise.schedule over noise.num_timesteps); l-DAE App.
    A fixes t = 10 of 1000 (64.5% vs 64.1% at t = 0). An encoder that takes no noise level (DiffMAE's,
    MAE's: they see clean visible patches) ignores it."""
    probe_sigma: float = -1.0
    """Probe noise level sigma given directly (>= 0), instead of noise.schedule at probe_t."""
    probe_input: str = "clean"
    """'clean' (l-DAE App. A: clean image, conditioned on probe_t) or 'noisy' (noised at that
    level through the tokenizer; l-DAE App. A: 65.0% at t = 10..40, its Table 4 setting)."""
    probe_depth: int = 0
    """Probe after the first k blocks (0: all the encoder's); l-DAE App. A probes DiT-L at k =
    9..15 of its 24, best at 12 (64.5%). With l-DAE's ldae.layout='dit' k may pass the encoder (up to
    encoder_depth + decoder_depth): the decoder's first blocks continue the same tokens."""

    def __post_init__(self) -> None:
        _check(self.probe_epochs >= 1 and self.probe_batch_size >= 1, "eval.probe_* must be >= 1")
        try:
            ks = [int(k) for k in self.knn_k.split(",") if k.strip()]
            sig = [float(s) for s in self.figure_sigmas.split(",") if s.strip()]
        except ValueError as e:
            raise ConfigError(f"eval.knn_k / eval.figure_sigmas must be comma-separated numbers: {e}") from None
        _check(all(k >= 1 for k in ks), "eval.knn_k values must be >= 1")
        _check(all(s >= 0 for s in sig), "eval.figure_sigmas values must be >= 0")
        _check(self.probe_t >= 0, f"eval.probe_t={self.probe_t} must be >= 0")
        _one_of("eval.probe_input", self.probe_input, ("clean", "noisy"))
        _check(self.probe_depth >= 0, f"eval.probe_depth={self.probe_depth} must be >= 0 (0: all blocks)")


@dataclass
class ProfileConfig:
    steps: int = 0
    """Profile this many training steps with torch.profiler (0: off); writes a Chrome trace and a
    table of the top kernels by device time."""
    out_dir: str = ""
    """Where the trace goes ('' : OUT/profile)."""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, f"profile.steps={self.steps} must be >= 0")


# The shared sections, in the order a saved config lists them; each method's sections follow.
SHARED_SECTIONS: dict[str, type] = {
    "model": ModelConfig, "tokenizer": TokenizerConfig, "objective": ObjectiveConfig, "data": DataConfig,
    "optim": OptimConfig, "engine": EngineConfig, "eval": EvalConfig, "profile": ProfileConfig,
}


def section_types() -> dict[str, type]:
    """Every section a Config holds, by name: the shared ones, then those the methods registered."""
    methods = _registered(_registry.SECTIONS)
    clash = sorted(set(methods) & set(SHARED_SECTIONS))
    if clash:
        raise ValueError(f"method config section(s) {clash} take the name of a shared section")
    return {**SHARED_SECTIONS, **methods}


class Config:
    """The run's configuration: one attribute per section (cfg.model, cfg.data, ..., and each
    registered method's, e.g. cfg.noise) and `preset`, the name of the preset it started from
    (informational). Not a dataclass: its sections are known once the methods registered; use
    `cfg.replace(section=...)` where dataclasses.replace would be used."""

    model: ModelConfig
    tokenizer: TokenizerConfig
    objective: ObjectiveConfig
    data: DataConfig
    optim: OptimConfig
    engine: EngineConfig
    eval: EvalConfig
    profile: ProfileConfig
    preset: str

    def __init__(self, preset: str = "demo", **sections: Any) -> None:
        types = section_types()
        bad = sorted(set(sections) - set(types))
        _check(not bad, f"unknown config section(s) {bad}; known: {', '.join(types)}")
        for name, typ in types.items():
            sec = sections.get(name)
            self.__dict__[name] = typ() if sec is None else sec
        self.preset = preset
        for name in types:
            _check_types(name, self.__dict__[name])
        # The model section's cross-section fields (latent_dim, num_classes, num_frames) read
        # this config; a section object shared by two configs follows the newest.
        self.model.__dict__["_run"] = self
        self.validate()

    @staticmethod
    def sections() -> dict[str, type]:
        """Section name -> its dataclass (section_types())."""
        return section_types()

    def replace(self, **changes: Any) -> Config:
        """A new Config with the sections in `changes` replaced (and `preset`), validated again."""
        parts = {name: self.__dict__[name] for name in section_types()}
        return Config(**{"preset": self.preset, **parts, **changes})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return self.preset == other.preset and all(
            self.__dict__[n] == other.__dict__.get(n) for n in section_types())

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it was

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={self.__dict__[n]!r}" for n in section_types())
        return f"Config({parts}, preset={self.preset!r})"

    # Derived quantities -------------------------------------------------------------------
    @property
    def patch_dim(self) -> int:
        """D = 3 p^2, the length of a flattened patch."""
        return 3 * self.model.patch_size**2

    @property
    def num_patches(self) -> int:
        return (self.data.img_size // self.model.patch_size) ** 2

    def validate(self) -> None:
        # The method's own name list and relations live with the method (MethodSpec.validate).
        METHODS = _registered(_registry.METHODS)
        _one_of("objective.method", self.objective.method, tuple(METHODS))
        spec = METHODS[self.objective.method]
        spec.validate(self)
        self._validate_video()
        p, s = self.model.patch_size, self.data.img_size
        _check(s % p == 0, f"data.img_size={s} is not divisible by model.patch_size={p}; "
               f"choose an image size that is a multiple of {p}")
        D = self.patch_dim
        _check(self.tokenizer.latent_dim <= D,
               f"tokenizer.latent_dim={self.tokenizer.latent_dim} is larger than 3*p^2={D} "
               f"(patch size {p}); allowed: 1..{D}")
        # The blocks a probe can read are the method's (l-DAE's 'dit' layout reads past its encoder).
        room, which = spec.probe_blocks(self)
        _check(self.eval.probe_depth <= room,
               f"eval.probe_depth={self.eval.probe_depth} is deeper than the {room} blocks the probe can read "
               f"({which}); allowed: 0..{room}")
        if _registry.SOURCES[self.data.source].sharded:
            # Shard paths are checked when the data is opened: presets name no local path.
            _check(self.data.epoch_size > 0,
                   f"data.source={self.data.source!r} needs data.epoch_size (samples per epoch: images, or clips for video)")
        _check(self.engine.time_budget_s == 0 or self.engine.backend == "single",
               "engine.time_budget_s needs engine.backend='single' (ranks with their own clocks "
               "could stop at different steps)")

    def _validate_video(self) -> None:
        m, d = self.model, self.data
        if d.num_frames:
            video = [n for n, s in _registry.METHODS.items() if s.video]
            _check(self.objective.method in video,
                   f"data.num_frames={d.num_frames} (video) is trained by objective.method="
                   f"{' or '.join(video)} only")
            _check(m.num_frames == d.num_frames,
                   f"model.num_frames={m.num_frames} differs from data.num_frames={d.num_frames}; leave it at 0")
        else:
            _check(m.num_frames == 0, f"model.num_frames={m.num_frames} needs video data (data.num_frames >= 1)")
        # Said now, not after the training it would follow: the probe, kNN and fine-tuning take
        # images, and a clip encoder's patch embedding is 3-D.
        _check(not (d.num_frames and self.eval.probe),
               f"eval.probe: the linear probe and kNN take images, not the clips of data.num_frames="
               f"{d.num_frames}; set eval.probe=false (the video figure still runs)")

    def epoch_size(self) -> int:
        return self.data.epoch_size or self.data.synthetic_images

    def global_batch(self, world_size: int = 1) -> int:
        return self.data.batch_size * self.engine.grad_accum * world_size

    def lr(self, world_size: int = 1) -> float:
        return self.optim.lr or self.optim.blr * self.global_batch(world_size) / 256

    def total_steps(self, world_size: int = 1) -> int:
        if self.engine.steps:
            return self.engine.steps
        return max(1, int(self.engine.epochs * self.epoch_size() // self.global_batch(world_size)))

    def steps_per_epoch(self, world_size: int = 1) -> float:
        return self.epoch_size() / self.global_batch(world_size)

    def to_dict(self) -> dict[str, Any]:
        """What the user set, section by section: derived fields store their unset default, so
        the saved config.json replays as intent (Derived)."""
        out: dict[str, Any] = {}
        for name in section_types():
            sec = self.__dict__[name]
            out[name] = {g.name: stored(sec, g.name) for g in dataclasses.fields(sec)}
        out["preset"] = self.preset
        return json.loads(json.dumps(out))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        d = migrate(d)
        sections = [*section_types(), "preset"]
        kwargs: dict[str, Any] = {}
        for name, value in d.items():
            _check(name in sections, f"unknown config section {name!r}; known: {', '.join(sections)}")
            if isinstance(value, dict):
                sub = _section_type(name)
                known = {f.name for f in dataclasses.fields(sub)}
                bad = set(value) - known
                _check(not bad, f"unknown field(s) {sorted(bad)} in section {name!r}; known: {sorted(known)}")
                kwargs[name] = _build_section(name, sub, value)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """A config file (JSON); every error names the file (and the field)."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
        try:
            d = json.loads(text, parse_constant=_no_constant)
        except ValueError as e:
            raise ConfigError(f"--config {path}: not valid JSON ({e})") from None
        _check(isinstance(d, dict), f"--config {path}: expected a JSON object of sections")
        try:
            return cls.from_dict(_unresolve(d))
        except ConfigError as e:
            raise ConfigError(f"--config {path}: {e}") from None


def migrate(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict (a saved config, or the tree of a command line) as this version reads it:
    - fields that moved to a method's section (config_registry.RENAMED: `objective.mask_ratio` ->
      `diffmae.mask_ratio` or `mae.mask_ratio`, ...) are read from their old keys where the new
      ones are not set, into the sections of the method `d` runs (objective.method); an old key
      that method reads in none of its new places is dropped (it never read it);
    - a field the method took over from another method's section (config_registry.TOOK_OVER:
      DiffMAE's `noise.num_timesteps` -> `diffmae.num_timesteps`) moves to its own field where that
      is not set, so a config saved before keeps its value and the old key reads its default;
    - fields now derived (model.arch, always equal to objective.method) are dropped.
    `d` is not changed."""
    renamed = _registered(_registry.RENAMED)
    d = dict(d)
    method = _method_of(d)
    for old in renamed:
        sec, _, name = old.partition(".")
        if not isinstance(d.get(sec), dict) or name not in d[sec]:
            continue
        d[sec] = dict(d[sec])
        value = d[sec].pop(name)
        for new in _renamed_targets(old, method):
            nsec, _, nname = new.partition(".")
            target = d[nsec] = dict(d.get(nsec) or {})
            target.setdefault(nname, value)
    for old, new in _registry.TOOK_OVER.get(method, {}).items():
        (sec, _, name), (nsec, _, nname) = old.partition("."), new.partition(".")
        if not isinstance(d.get(sec), dict) or name not in d[sec]:
            continue
        target = d.get(nsec) if isinstance(d.get(nsec), dict) else {}
        if nname not in target:
            d[sec] = dict(d[sec])
            d[nsec] = {**target, nname: d[sec].pop(name)}
    return _drop_arch(d)


def _method_of(d: dict[str, Any]) -> str:
    """The objective.method a config dict names (the default when it names none)."""
    obj = d.get("objective")
    method = obj.get("method") if isinstance(obj, dict) else None
    return method if isinstance(method, str) else ObjectiveConfig.method


def _renamed_targets(old: str, method: str | None) -> list[str]:
    """Where old spelling `old` (config_registry.RENAMED) sets its value when `method` runs: its new
    places in that method's sections (none when it reads none of them); every new place when the
    method is not known (the config is refused for that later)."""
    news = _registry.RENAMED[old]
    spec = _registry.METHODS.get(method) if method is not None else None
    if spec is None:
        return list(news)
    return [n for n in news if n.partition(".")[0] in spec.sections]


def _drop_arch(d: dict[str, Any]) -> dict[str, Any]:
    model = d.get("model")
    if isinstance(model, dict) and "arch" in model:
        model = dict(model)
        arch = model.pop("arch")
        method = (d.get("objective") or {}).get("method", ObjectiveConfig.method)
        _check(arch in ("", method), f"model.arch={arch!r} differs from objective.method={method!r}: "
               f"the method names its own network; drop model.arch")
        d = {**d, "model": model}
    return d


def _unresolve(d: dict[str, Any]) -> dict[str, Any]:
    """A config file written by a version that stored derived values back (model width / depths /
    heads from model.size, decoder width / heads, latent_dim, num_classes, num_frames, the crop
    fields of a center crop): a stored value equal to what would be derived from the stored
    intent is taken as derived (unset), so a replay with another model.size, data.crop or
    data.synthetic_classes follows it as a fresh run does."""
    model, data = d.get("model"), d.get("data")
    if not isinstance(model, dict):
        return d
    model, data = dict(model), dict(data) if isinstance(data, dict) else {}
    tok = d.get("tokenizer") if isinstance(d.get("tokenizer"), dict) else {}
    dims = MODEL_SIZES.get(model.get("size", ModelConfig.size), {})
    for k, v in dims.items():
        if model.get(k) == v:
            model[k] = 0
    width = model.get("width") or dims.get("width")
    heads = model.get("num_heads") or dims.get("num_heads")
    if model.get("decoder_width") == width:
        model["decoder_width"] = 0
    if model.get("decoder_heads") == heads:
        model["decoder_heads"] = 0
    derived = {"latent_dim": tok.get("latent_dim", TokenizerConfig.latent_dim),
               "num_frames": data.get("num_frames", DataConfig.num_frames),
               "num_classes": (data.get("synthetic_classes", DataConfig.synthetic_classes)
                               if data.get("source", DataConfig.source) == "synthetic"
                               else data.get("num_classes", DataConfig.num_classes))}
    for k, v in derived.items():
        if model.get(k) == v:
            model[k] = 0
    if data.get("crop") == "center" and (data.get("crop_min_scale"), data.get("hflip")) == (1.0, False):
        data["crop_min_scale"], data["hflip"] = DataConfig.crop_min_scale, DataConfig.hflip
    out = {**d, "model": model}
    if data:
        out["data"] = data
    return out


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a config may hold")


def _section_type(name: str) -> type:
    return section_types()[name]


_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "a boolean", "str": "a string"}


def _coerce(key: str, typ: str, value: Any) -> Any:
    """`value` of field `key` as its declared type, or ConfigError naming the field. Numbers
    must be finite: an inf or NaN learning rate or noise level would only fail steps later."""
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str)}.get(typ, True)
    _check(ok, f"{key}: expected {_TYPE_NAMES.get(typ, typ)}, got {value!r} ({type(value).__name__})")
    if typ == "float":
        value = float(value)
        _check(math.isfinite(value), f"{key}={value} must be a finite number")
    return value


def _build_section(name: str, sub: type, values: dict[str, Any]) -> Any:
    types = {f.name: f.type for f in dataclasses.fields(sub)}
    return sub(**{k: _coerce(f"{name}.{k}", types[k], v) for k, v in values.items()})


def _check_types(name: str, sec: Any) -> None:
    for f in dataclasses.fields(sec):
        setattr(sec, f.name, _coerce(f"{name}.{f.name}", f.type, stored(sec, f.name)))


# Presets ----------------------------------------------------------------------------------
# Each preset is a dict of overrides on the defaults, so `--preset X --section.field=v` composes.
# Every preset belongs to a method (MethodSpec.presets), which registers it (config_registry.py):
# this dict fills as ldae_fast.methods is imported.
PRESETS: dict[str, dict[str, Any]] = _registry.PRESETS
# `ldae-fast eval --finetune-head-init=printed`: the head init std DiffMAE's supplement prints
# (2^-5), beside the 2e-5 we read it as (methods/diffmae/finetune.py, docs/diffmae.md).
HEAD_INIT_STD_AS_PRINTED = 2 ** -5


_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def _parse_value(raw: str, typ: Any) -> Any:
    if typ in (bool, "bool"):
        low = raw.lower()
        if low in _TRUE_WORDS:
            return True
        if low in _FALSE_WORDS:
            return False
        raise ConfigError(f"expected a boolean (true/false), got {raw!r}")
    if typ in (int, "int"):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"expected an integer, got {raw!r}") from None
    if typ in (float, "float"):
        try:
            v = float(raw)
        except ValueError:
            raise ConfigError(f"expected a number, got {raw!r}") from None
        if not math.isfinite(v):
            raise ConfigError(f"expected a finite number, got {raw!r}")
        return v
    return raw


def _apply(tree: dict[str, dict[str, Any]], key: str, value: Any, from_cli: bool, method: str | None = None) -> None:
    # An old spelling of a field that moved to a method's section sets it where it lives now, in
    # the sections of `method` (the one that runs) when it is known.
    if key in _registry.RENAMED:
        if from_cli:
            try:
                value = _parse_value(value, _field_type(key))
            except ConfigError as e:
                raise ConfigError(f"{key}: {e}") from None
        for new_key in _renamed_targets(key, method):
            _apply(tree, new_key, value, from_cli=False)
        return
    section, _, name = key.partition(".")
    _check(bool(name), f"override {key!r} must look like section.field")
    _check(section in tree and isinstance(tree[section], dict) and section in section_types(),
           f"unknown config section {section!r} in {key!r}; known: {', '.join(k for k in tree if k != 'preset')}")
    sub = _section_type(section)
    types = {f.name: f.type for f in dataclasses.fields(sub)}
    _check(name in types, f"unknown field {name!r} in section {section!r}; known: {', '.join(types)}")
    if from_cli:
        try:
            value = _parse_value(value, types[name])
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    tree[section][name] = value


PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The checkout: the directory above the ldae_fast package (site-packages when installed)."""


def preset_data_path(pattern: str) -> str:
    """A preset's relative shard pattern ('../shared/data/...', written from the checkout), taken
    from the current directory when its folder is there, else from the project root: there when
    the folder is, and otherwise too, so a missing-shard error names the absolute path it tried."""
    parts = []
    for part in pattern.split("::"):
        part = part.strip()
        folder = Path(part).parent
        if (part and not Path(part).is_absolute() and ":" not in part.split("/")[0]
                and "{" not in str(folder) and not folder.is_dir()):
            part = str(PROJECT_ROOT / part)
        parts.append(part)
    return "::".join(parts)


def build_config(preset: str = "demo", overrides: dict[str, str] | None = None) -> Config:
    """Defaults <- preset <- overrides (strings as typed on the command line). A preset's shard
    paths are found from the checkout when the current directory lacks them (preset_data_path)."""
    _check(preset in _registered(PRESETS), f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    overrides = overrides or {}
    method = overrides.get("objective.method", PRESETS[preset].get("objective.method", ObjectiveConfig.method))
    tree: dict[str, Any] = {name: {} for name in section_types()}
    for k, v in PRESETS[preset].items():
        if k in {f"data.{f}" for f in SHARD_FIELDS} and isinstance(v, str):
            v = preset_data_path(v)
        _apply(tree, k, v, from_cli=False, method=method)
    for k, v in overrides.items():
        _apply(tree, k, v, from_cli=True, method=method)
    cfg = _reads_every_override(Config.from_dict({**tree, "preset": preset}), overrides)
    return _reads_every_stored(cfg, f"preset {preset!r}")


# Short flags that stand for a config field.
ALIASES = {"kernels": "engine.kernels", "resume": "engine.resume", "out": "engine.out_dir",
           "steps": "engine.steps", "device": "engine.device"}

_BOOL_WORDS = _TRUE_WORDS + _FALSE_WORDS


def _field_type(key: str) -> Any:
    """The annotated type of `section.field`, or None when there is no such field (the caller's
    `_apply` then reports it with the known names)."""
    key = (_registry.RENAMED.get(key) or [key])[0]
    section, _, name = key.partition(".")
    types = section_types()
    if section not in types:
        return None
    return typing.get_type_hints(types[section]).get(name)


def parse_cli(argv: list[str]) -> tuple[Config, list[str]]:
    """Parse `--preset NAME`, `--config FILE.json` and `--section.field=value` (or `--a.b value`).

    A boolean field also takes `--section.field` (true) and `--no-section.field` (false); bare, it
    consumes the next argument only when that is a boolean word (true/false/yes/no/on/off/1/0).
    Returns the config and the arguments it did not consume (for the caller's own flags).
    """
    preset, config_file, overrides, rest = "demo", None, {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            rest.append(arg)
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        if key.startswith("no-") and "." in key and _field_type(key[3:]) is bool:
            _check(not eq, f"{arg}: --no-{key[3:]} takes no value")
            overrides[key[3:]] = "false"
            i += 1
            continue
        key = ALIASES.get(key, key)
        consumed = 1
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if "." in key and _field_type(key) is bool:
                if nxt is not None and nxt.lower() in _BOOL_WORDS:
                    value, consumed = nxt, 2
                else:
                    value = "true"
            elif key in ("preset", "config") or "." in key:
                _check(nxt is not None, f"--{key} needs a value")
                value, consumed = nxt, 2
            else:
                rest.append(arg)  # the caller's flag; its value, if any, is the caller's too
                i += 1
                continue
        if key == "preset":
            preset = value
        elif key == "config":
            config_file = value
        elif "." in key:
            overrides[key] = value
        else:
            rest.append(arg)
        i += consumed
    if config_file:
        base = Config.load(config_file)
        for key, v in untrusted_shard_fields(base.to_dict()["data"], overrides).items():
            _check(False, f"--config {config_file}: {key}={v[:80]!r} expands to a pipe: command or "
                          f"remote URL, which runs a command or reaches the network, so it is taken "
                          f"from the command line only: pass --{key}=... to use it")
        tree = base.to_dict()
        tree.pop("preset")
        method = overrides.get("objective.method", tree["objective"]["method"])
        for k, v in overrides.items():
            _apply(tree, k, v, from_cli=True, method=method)
        cfg = _reads_every_override(Config.from_dict({**tree, "preset": base.preset}), overrides)
        return _reads_every_stored(cfg, f"--config {config_file}"), rest
    return build_config(preset, overrides), rest


def _owners(section: str, method: str) -> list[str]:
    """The methods whose config section `section` is, when `method` does not read it (registered by
    other methods only); [] for a shared section or one of `method`'s own."""
    if section not in _registry.SECTIONS or section in _registry.METHODS[method].sections:
        return []
    return [n for n, s in _registry.METHODS.items() if section in s.sections]


def _reads_every_override(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Refuse a command-line setting the running method never reads: a field of another method's
    section (`--diffmae.mask_ratio` or `--noise.schedule` on an MAE run), or an old spelling whose
    new places are all another method's (`--objective.mask_ratio` on an l-DAE run). A field the
    method took over from another's section (`--noise.num_timesteps` on a DiffMAE run) is refused
    with the name it has now."""
    method = cfg.objective.method
    for key, value in overrides.items():
        if key in _registry.RENAMED:
            news = _registry.RENAMED[key]
            _check(bool(_renamed_targets(key, method)),
                   f"--{key}: now {' / '.join(news)}, which objective.method={method!r} does not read; set "
                   f"--objective.method={news[0].partition('.')[0]} or leave it out")
            continue
        owners = _owners(key.partition(".")[0], method)
        if not owners:
            continue
        new = _registry.TOOK_OVER.get(method, {}).get(key)
        _check(new is None, f"--{key}: a setting of method {owners[0]!r}; objective.method={method!r} reads "
                            f"{new} instead: set --{new}={value}")
        _check(False, f"--{key}: a setting of method {owners[0]!r}, and objective.method={method!r} does "
                      f"not read it; set --objective.method={owners[0]} or leave it out")
    return cfg


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _set_by_a_shared_old_spelling(cfg: Config, key: str, value: Any) -> bool:
    """Whether `key` is one of the new places of an old spelling that the running method reads in
    another of them, holding the same value: a config saved before old spellings went to the
    running method alone (`--objective.mask_ratio=0.6` on a DiffMAE run set mae.mask_ratio too)."""
    for news in _registry.RENAMED.values():
        if key not in news:
            continue
        for new in news:
            sec, _, name = new.partition(".")
            if (new != key and sec in _registry.METHODS[cfg.objective.method].sections
                    and stored(cfg.__dict__[sec], name) == value):
                return True
    return False


def _reads_every_stored(cfg: Config, source: str) -> Config:
    """Refuse a value the running method never reads that came from `source` (a `--config` file or
    a preset): a field of another method's section that differs from its default. A stored config
    holds every section, the other methods' at their defaults, so a value that differs was set for
    another method (the file's own run, or a hand edit) and would be stored here and never read.
    Old spellings (config_registry.RENAMED) are not judged: migrate() puts them where the running
    method reads them, or drops them."""
    method = cfg.objective.method
    for name, typ in _registry.SECTIONS.items():
        owners = _owners(name, method)
        for f in dataclasses.fields(typ) if owners else ():
            key = f"{name}.{f.name}"
            value, default = stored(cfg.__dict__[name], f.name), _field_default(f)
            if key in _registry.RENAMED or value == default or _set_by_a_shared_old_spelling(cfg, key, value):
                continue
            new = _registry.TOOK_OVER.get(method, {}).get(key)
            if new is not None:
                _check(False, f"{source}: {key}={value!r} is a setting of method {owners[0]!r}; objective.method="
                              f"{method!r} reads {new} instead: set {new} there and {key} back to {default!r}")
            fix = (f"set it back to {default!r} (or drop section {name!r} from the file)" if source.startswith("--config")
                   else f"pick a preset of method {method!r}")
            _check(False, f"{source}: {key}={value!r} is a setting of method {owners[0]!r}, and "
                          f"objective.method={method!r} does not read it; {fix}, or run --objective.method={owners[0]}")
    return cfg


# Help text generated from the dataclasses ---------------------------------------------------

def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right under a field) of a dataclass, read from its source:
    the same text a reader of this file sees, so the help cannot drift from the code."""
    import ast
    import inspect
    import textwrap

    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError):  # no source (e.g. a frozen build): fields without text
        return {}
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(t: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(t, str(t))


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def config_help(preset: str | None = "demo", width: int = 100) -> str:
    """Every config field by section: `--section.field TYPE (default D)` and its docstring, plus
    the value `preset` sets where it sets one (`[demo: V]`)."""
    import textwrap

    aliased = {v: k for k, v in ALIASES.items()}
    preset_values = PRESETS.get(preset, {}) if preset else {}
    lines = []
    for sec_name, cls in section_types().items():
        lines.append(f"\n{sec_name}:")
        docs, hints = _field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{sec_name}.{f.name}"
            typ = hints[f.name]
            flag = f"--[no-]{key}" if typ is bool else f"--{key}"
            alias = f", --{aliased[key]}" if key in aliased else ""
            by_preset = f" [{preset}: {preset_values[key]}]" if key in preset_values else ""
            lines.append(f"  {flag}{alias} {_type_name(typ).upper()} (default {_default_text(f)}){by_preset}")
            if docs.get(f.name):
                lines += textwrap.wrap(docs[f.name], width, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6, break_on_hyphens=False,
                                       break_long_words=False)
    return "\n".join(lines).lstrip("\n")
