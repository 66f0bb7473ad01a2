"""MethodSpec: everything the engine, eval, bench and CLIs may ask of one method, in one record.

A method folder (methods/<name>/) exports one MethodSpec; methods/__init__.py lists them. The
record itself is light (no torch at import): each entry that needs the method's code imports it
when called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ImageNet-1k's training images: the presets' epoch.
IMAGENET_TRAIN_IMAGES = 1_281_167


class PeerNotApplicable(ValueError):
    """The train-step benchmark's peer row of a method that has no timm counterpart there."""


@dataclass(frozen=True)
class BenchFlag:
    """A flag of the train-step benchmark (bench/train_step.py) that sets one of the method's
    config fields."""

    key: str
    """The 'section.field' it sets."""
    default: Any
    """The benchmark's default: the method's paper setting (may differ from the config default)."""
    help: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepBench:
    """What the train-step benchmark (bench/train_step.py) measures of a method beside the
    registry's builders: its shapes and flags, its timm peer, its rows' fields."""

    label: str = ""
    """Prefix of the rows' model name, so tables keyed on the model never mix two methods' rows of
    the same ViT ('' for the benchmark's first method)."""
    gpu_defaults: Mapping[str, Any] = field(default_factory=dict)
    """The benchmark's GPU defaults (sizes, batch_sizes, img_size, ...) this method changes."""
    variants: str = "a,b,c,d"
    """The variants run when --variants is not given."""
    flags: Mapping[str, BenchFlag] = field(default_factory=dict)
    """Flags by argparse name (mask_ratio: --mask-ratio)."""
    overrides: Callable[[str], Mapping[str, Any]] = lambda size: {}
    """model.size -> config overrides the method's presets use at that size (DiffMAE's decoder)."""
    peer: Callable[[Any], tuple[Any, tuple[float, float]]] | None = None
    """cfg -> (the network assembled from timm blocks, its (forward, training) FLOPs per image);
    None, or raising PeerNotApplicable: no peer row."""
    row: Callable[[Any], Mapping[str, Any]] = lambda cfg: {}
    """cfg -> the fields that say what a row measured beside the shared ones."""
    tokens: Callable[[Any], int] = lambda cfg: cfg.num_patches
    """cfg -> tokens per image through the blocks (the memory estimate)."""
    tokenizer: bool = False
    """Trains through a linear tokenizer: the benchmark gives it a random orthonormal basis."""
    flop_count: str = ""
    """How its training FLOPs are counted (MethodSpec.train_flops), for the results' meta."""
    targets: bool = False
    """Its rows are judged against the benchmark's speed targets."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    """The value of objective.method that selects this method."""
    title: str
    """How logs and figures name it (l-DAE, DiffMAE, MAE)."""
    build_method: Callable[..., Any]
    """(cfg, device, rank=, world_size=, tokenizer=, kernels=) -> the method object (base.Method)."""
    build_model: Callable[..., Any]
    """(cfg, kernels) -> the network, for cfg.data.img_size inputs."""
    train_flops: Callable[[Any], tuple[float, float]]
    """cfg -> (forward, training) FLOPs per image or clip, for the logged MFU."""
    param_count: Callable[[Any], dict[str, int]]
    """cfg -> analytic parameter counts {'encoder', 'decoder', 'total'}."""
    figure: Callable[..., tuple[Path, str]]
    """(cfg, model, method, out_dir, *, images=None, step=0) -> (PNG path, one-line caption): the
    method's own figure; `images` are normalised val images (None: the method reads its own)."""
    probe_view: Callable[..., Any]
    """(encoder, cfg, method) -> the module the probe and kNN read features from."""
    probe_note: Callable[[Any], str]
    """cfg -> what the probe conditions on, for the log (e.g. l-DAE's sigma)."""
    probe_sigma: Callable[[Any], float] = lambda cfg: 0.0
    """cfg -> the noise level the probe conditions on (part of a feature store's key); 0 for an
    encoder that takes none."""
    probe_conditioned: bool = False
    """The encoder takes a noise level, so eval.probe_t / probe_sigma / probe_input change what the
    probe reads; without one they change nothing, and a feature store's key leaves them out."""
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Named presets: config overrides, each naming this method (or running it by default)."""
    validate: Callable[[Any], None] = lambda cfg: None
    """Relations between config fields this method needs; raises config.ConfigError."""
    video: bool = False
    """Trains on clips (data.num_frames > 0) as well as images."""
    finetune_recipes: Callable[[], Mapping[str, Mapping[str, Any]]] = dict
    """() -> fine-tuning recipe fields (eval.finetune.FinetuneRecipe) by model.size, which `ldae-fast
    eval --protocols finetune` applies to this method's checkpoints (empty: the default recipe,
    labelled as such)."""
    finetune_source: str = ""
    """Where `finetune_recipes` come from (a paper's table), for the eval table's recipe column."""
    shape_fields: tuple[tuple[tuple[str, str], Any], ...] = ()
    """((section, field), default) of the config fields beyond the shared ones that set this
    method's network shape: a resume that changes one is refused (engine.guard)."""
    resolved: Callable[[Any], Mapping[str, Any]] = lambda cfg: {}
    """cfg -> {'section.field': value} of shape fields as the network reads them where that is not
    what is stored (l-DAE's adaln_dim 0 reads as a width): compared so (engine.guard)."""
    probe_blocks: Callable[[Any], tuple[int, str]] = lambda cfg: (cfg.model.encoder_depth, "model.encoder_depth")
    """cfg -> (the blocks eval.probe_depth may reach, which fields say so)."""
    probe_encoder: Callable[[Any, Any], Any] = lambda model, cfg: _encoder_probe(model, cfg)
    """(model, cfg) -> what the probe reads of the network at eval.probe_depth before the probe
    view wraps it: the encoder, or a method's own reading past it (l-DAE's 'dit' layout continues
    into the decoder's first blocks); a depth the network lacks is a ValueError."""
    rows: Callable[[], Mapping[str, Any]] = dict
    """Named ablation rows (`ldae-fast ablate --rows`): l-DAE's deconstruction trajectory."""
    paper_probe_sweep: Callable[[Any], Mapping[str, Any]] = lambda cfg: {}
    """cfg -> the paper's linear-probe top-1 over probe depth k and probe t, beside a probe sweep's
    own: {'source': where and at what scale, 'matches': whether cfg is that network, 'top1':
    {(k, t, input): top-1}}; empty where the paper printed none."""
    sections: Mapping[str, type] = field(default_factory=dict)
    """This method's config sections by name (`--name.field=value`), dataclasses that validate
    themselves; registered into the config mechanism (config_registry.py). Two methods may
    list the same section (the same class)."""
    step_bench: Callable[[], StepBench] = StepBench
    """() -> what the train-step benchmark measures of this method (torch loads when it is called)."""
    renamed: Mapping[str, str] = field(default_factory=dict)
    """Old 'section.field' spellings of this method's fields -> where they live now: saved configs
    and command lines that use them still load."""
    took_over: Mapping[str, str] = field(default_factory=dict)
    """'section.field' of another method's section this method read before it had its own field
    -> that field ('noise.num_timesteps' -> 'diffmae.num_timesteps'): a stored config of this
    method that sets the old key and not the new one loads the old key's value into the new field
    and leaves the old at its default (config.migrate); a command line setting the old key under
    this method is refused with the new key's name."""
    model_links: Callable[[Any], frozenset[str]] = lambda cfg: frozenset()
    """cfg -> the model fields derived from the rest of the run that this method's network reads:
    'latent_dim' (tokenizer.latent_dim, for latent tokens in or out), 'num_classes' (the data's,
    for class conditioning); the others read 0."""


def _encoder_probe(model, cfg):
    from .probe import encoder_probe
    return encoder_probe(model, cfg)


def encoder_decoder_params(build: Callable[[], Any]) -> dict[str, int]:
    """{encoder, decoder, total} parameter counts of the network `build()` returns, built on the
    meta device (no memory, no init)."""
    import torch

    with torch.device("meta"):
        m = build()
    enc, dec = (sum(p.numel() for p in part.parameters()) for part in (m.encoder, m.decoder))
    return {"encoder": enc, "decoder": dec, "total": enc + dec}


def unconditioned_note(cfg) -> str:
    """The probe line of a method whose encoder takes no noise level (DiffMAE's, MAE's)."""
    return f"clean unmasked input, depth {cfg.eval.probe_depth or 'all'}"
