"""End-to-end fine-tuning with the pretraining method's recipe, on timm's own parts.

Our encoder is exported to a timm VisionTransformer (models/timm_export, or the timm ViT an
exported .safetensors already is) with drop path and a classifier head; from there every piece of
the recipe is timm's. Each method's registry entry carries its own recipe table
(MethodSpec.finetune_recipes: l-DAE App. B, DiffMAE supplement Table 1b, MAE's paper), picked by
recipe_for_method; an encoder without one (an exported encoder, a method without a table) gets
the default, labelled so. The default (FinetuneRecipe's fields) holds l-DAE App. B's values:
batch 1024, lr 4e-3 (blr 1e-3), wd 0.05, drop path 0.1, 100 epochs, layer-wise lr decay 0.85
(0.65 from 24 blocks on: recipe_for), MixUp 0.8, CutMix 1.0, RandAug (9, 0.5), EMA 0.9999, and
MAE's practice where that paper states nothing: label smoothing 0.1, RandomErasing 0.25, 5 warm-up
epochs then half-cycle cosine to 1e-6, AdamW (0.9, 0.999).

Input here: the normalised (M, 3, H, W) arrays of `build_eval_arrays` (synthetic data and
`--in-memory`, one process); training images go back to uint8 pixels once so the PIL-based
augmentations see what they were tuned on. Shards take the streaming, data-parallel, resumable
path with the same recipe: eval/finetune_stream.py.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..device import autocast_for, eval_mode
from ..errors import NonFiniteLoss
from ..lr_schedule import warmup_cosine
from .features import Log, module_device
from .linear_probe import Arrays, num_classes_of, topk_accuracy

PROTOCOL = "finetune"


@dataclass
class FinetuneRecipe:
    epochs: int = 100
    batch_size: int = 1024
    blr: float = 1e-3
    """lr = blr * batch / 256: l-DAE's lr 4e-3 at batch 1024."""
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.85
    drop_path: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    min_crop_scale: float = 0.08
    ema_decay: float = 0.9999
    pool: str = "avg"
    num_workers: int = 0
    seed: int = 0
    max_steps: int = 0
    """Stop after this many optimizer steps (0: the whole schedule); for smoke tests."""
    dropout: float = 0.0
    """Dropout before the classifier (DiffMAE's Kinetics column: 0.5)."""
    repeated_aug: int = 1
    """Augmented views of each training sample in a batch (DiffMAE's Kinetics column: 2); the
    batch counts views. The streaming fine-tune only."""
    head_init_std: float = 2e-5
    """Std of the fresh classifier's weights (truncated normal; bias 0): MAE's 2e-5, tiny, so the
    first steps do not wreck the pretrained features. DiffMAE's supplement prints "2^-5"
    (config.HEAD_INIT_STD_AS_PRINTED, `ldae-fast eval --finetune-head-init=printed`)."""


DEFAULT_SOURCE = "default recipe (no recipe for this method; l-DAE App. B's values)"


def recipe_for(encoder: nn.Module, **overrides) -> FinetuneRecipe:
    """The default recipe (l-DAE App. B's values): layer decay 0.85 for a ViT-B-deep encoder,
    0.65 for a 24-block ViT-L one; the rest (batch 1024, lr 4e-3, 100 epochs, ...) the same."""
    depth = len(getattr(encoder, "blocks", ()))
    base = FinetuneRecipe()
    if depth >= 24:
        base = dataclasses.replace(base, layer_decay=0.65)
    return dataclasses.replace(base, **overrides)


VIDEO_KEY = "video:"
"""Prefix of a method's fine-tuning table entries for clip encoders ('video:L': its ViT-L column
on Kinetics)."""


def recipe_for_method(method: str, size: str, encoder_depth: int, encoder: nn.Module,
                      video: bool = False, **overrides) -> tuple[FinetuneRecipe, str]:
    """(recipe, where it comes from) for an encoder pretrained by `method` (a registry name) at
    model.size `size`. A method with `finetune_recipes` takes the entry of its size, or for a size
    its table lacks the entry whose encoder depth is nearest (the tiny demo gets ViT-B's); any
    other the default `recipe_for`, named DEFAULT_SOURCE. The note names the table's source
    (MethodSpec.finetune_source). `video`: the table's clip entries ('video:SIZE') instead; a
    method without any has no video recipe (ValueError)."""
    from ..config import MODEL_SIZES
    from ..methods import METHODS

    table = dict(METHODS[method].finetune_recipes()) if method in METHODS else {}
    sizes = {k[len(VIDEO_KEY):] if video else k: v for k, v in table.items()
             if k.startswith(VIDEO_KEY) == video}
    if video and not sizes:
        raise ValueError(f"method {method!r} has no fine-tuning recipe for clip encoders")
    if not sizes:
        return recipe_for(encoder, **overrides), DEFAULT_SOURCE
    table = sizes
    key = size if size in table else min(
        table, key=lambda k: (abs(MODEL_SIZES[k]["encoder_depth"] - encoder_depth), k))
    source = METHODS[method].finetune_source
    note = (f"{method} {'video ' if video else ''}size {key}"
            + ("" if key == size else f" (nearest depth to {size}'s {encoder_depth} blocks)")
            + (f", {source}" if source else ""))
    return dataclasses.replace(FinetuneRecipe(), **{**table[key], **overrides}), note


def _set_drop_path(vit: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly to `rate` over the blocks (timm's / DeiT's rule), put into a
    timm ViT that was built without it."""
    from timm.layers import DropPath

    n = len(vit.blocks)
    for i, blk in enumerate(vit.blocks):
        r = rate * i / max(n - 1, 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(r) if r > 0 else nn.Identity())


def _timm_vit_from(encoder: nn.Module, num_classes: int, drop_path: float, pool: str) -> nn.Module:
    import timm

    gp = "avg" if pool == "avg" else "token"
    vit = getattr(encoder, "vit", None)
    if vit is not None:
        # An exported .safetensors loads as a timm ViT already (eval.reader.TimmEncoder).
        model = copy.deepcopy(vit)
        model.reset_classifier(num_classes, global_pool=gp)
        _set_drop_path(model, drop_path)
        return _add_fc_norm(model)
    from ldae_fast.models.timm_export import timm_kwargs, timm_state_dict

    # A 'mae' encoder's final norm is kept before the pooling (fc_norm=False), so every
    # pretrained weight loads and the fine-tuned trunk starts from the linear probe's features.
    kwargs = dict(timm_kwargs(encoder, global_pool=gp), num_classes=num_classes,
                  drop_path_rate=drop_path)
    model = _add_fc_norm(timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs))
    fresh = {"head.weight", "head.bias"} | {f"fc_norm.{n}" for n, _ in model.fc_norm.named_parameters()}
    missing, unexpected = model.load_state_dict(timm_state_dict(encoder), strict=False)
    if unexpected or set(missing) - fresh:
        raise RuntimeError(f"timm export does not match timm's VisionTransformer: missing "
                           f"{sorted(set(missing) - fresh)}, unexpected {sorted(unexpected)}")
    return model


def _add_fc_norm(model: nn.Module) -> nn.Module:
    """An encoder that ends in no norm ('dit': its last block's output is the feature) gets MAE's
    fine-tuning head: a fresh LayerNorm after the average pool (fc_norm), so the classifier reads
    normalised features whatever scale the residual stream grew to. The linear probe keeps its
    own BatchNorm without affine instead (eval/linear_probe.py)."""
    if isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity):
        # timm's norm_layer for ViT: LayerNorm with eps 1e-6, weight 1 and bias 0 to start.
        model.fc_norm = nn.LayerNorm(model.embed_dim, eps=1e-6)
    return model


def build_finetune_model(encoder: nn.Module, num_classes: int, drop_path: float = 0.1,
                         pool: str = "avg", seed: int = 0, head_init_std: float = 2e-5,
                         dropout: float = 0.0) -> nn.Module:
    """timm VisionTransformer carrying the encoder's weights, with a new classifier head
    (FinetuneRecipe.head_init_std) after dropout `dropout`. Works from our ViTEncoder and from an
    exported encoder (a timm ViT behind our interface)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _timm_vit_from(encoder, num_classes, drop_path, pool)
        # MAE's call: trunc_normal_ with its default cut at +-2 (absolute), i.e. untruncated at
        # either std.
        nn.init.trunc_normal_(model.head.weight, std=head_init_std)
    nn.init.zeros_(model.head.bias)
    if dropout > 0:
        model.head_drop = nn.Dropout(dropout)
    return model.float()


class _PixelDataset(torch.utils.data.Dataset):
    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.pixels, self.labels, self.transform = pixels, labels, transform

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(self.pixels[i].permute(1, 2, 0).numpy())
        return self.transform(img), self.labels[i]


def _to_uint8(images: torch.Tensor, denorm: Callable) -> torch.Tensor:
    out = torch.empty(images.shape, dtype=torch.uint8)
    for s in range(0, images.shape[0], 1024):
        x = denorm(images[s:s + 1024].float())
        out[s:s + 1024] = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def _train_transform(size: int, recipe: FinetuneRecipe, mean01: tuple[float, ...]):
    from torchvision import transforms as T

    from .ft_augment import rand_augment

    steps = [T.RandomResizedCrop(size, scale=(recipe.min_crop_scale, 1.0),
                                 interpolation=T.InterpolationMode.BICUBIC),
             T.RandomHorizontalFlip()]
    if recipe.rand_augment:
        steps.append(rand_augment(recipe.rand_augment, size, mean01))
    steps.append(T.PILToTensor())
    return T.Compose(steps)


def _make_ema(model: nn.Module, decay: float):
    if decay <= 0:
        return None
    try:
        from timm.utils import ModelEmaV3 as Ema
    except ImportError:
        from timm.utils import ModelEmaV2 as Ema
    return Ema(model, decay=decay)


def _ema_update(ema, model: nn.Module, step: int) -> None:
    try:
        ema.update(model, step=step)
    except TypeError:
        ema.update(model)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 256) -> list[float]:
    device = module_device(model)
    logits = []
    with eval_mode(model):
        for s in range(0, images.shape[0], batch_size):
            with autocast_for(device):
                logits.append(model(images[s:s + batch_size].to(device)).float())
    return topk_accuracy(torch.cat(logits), labels.to(device))


def finetune_model(
    model: nn.Module,
    train: Arrays,
    val: Arrays,
    recipe: FinetuneRecipe,
    *,
    num_classes: int,
    log: Log = None,
    norm: Optional[Callable] = None,
    denorm: Optional[Callable] = None,
    desc: str = "finetune",
) -> dict:
    """Fine-tune a timm classifier (already on its device) on array data; returns accuracies of the
    final weights and of the EMA, plus the last loss."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay

    if norm is None or denorm is None:
        from ldae_fast.data import denormalize, normalize

        norm, denorm = norm or normalize, denorm or denormalize
    t0 = time.perf_counter()
    device = module_device(model)
    images, labels = train
    M, _, H, _ = images.shape
    bs = min(recipe.batch_size, M)
    bs -= bs % 2  # batch-mode mixup pairs each image with the batch flipped: needs an even batch
    if bs < 2:
        raise ValueError(f"{desc}: need at least 2 training images, got {M}")
    lr = recipe.blr * bs / 256

    mean01 = tuple(denorm(torch.zeros(1, 3, 1, 1)).flatten().tolist())
    ds = _PixelDataset(_to_uint8(images, denorm), labels, _train_transform(H, recipe, mean01))
    gen = torch.Generator().manual_seed(recipe.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True,
                                         num_workers=recipe.num_workers, generator=gen,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=recipe.num_workers > 0)
    steps_per_epoch = len(loader)

    mix = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        mix = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=1.0, switch_prob=0.5,
                    mode="batch", label_smoothing=recipe.label_smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif recipe.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=recipe.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    erase = (RandomErasing(recipe.reprob, mode="pixel", max_count=1, device=str(device))
             if recipe.reprob > 0 else None)

    groups = param_groups_layer_decay(model, weight_decay=recipe.weight_decay,
                                      no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=recipe.layer_decay)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(groups, lr=lr, betas=recipe.betas, **fused)
    ema = _make_ema(model, recipe.ema_decay)

    total = recipe.epochs * steps_per_epoch
    if recipe.max_steps:
        total = min(total, recipe.max_steps)
    step, last_log, last_loss = 0, t0, float("nan")
    if log is not None:
        log(f"{desc}: {M} images, batch {bs}, lr {lr:.2e}, {recipe.epochs} epochs "
            f"({steps_per_epoch} steps each), layer decay {recipe.layer_decay}")
    model.train()
    # The global RNG drives mixup, random erasing and drop path; seeding it makes a run repeatable.
    torch.manual_seed(recipe.seed)
    while step < total:
        for xb, yb in loader:
            if step >= total:
                break
            ep = step / steps_per_epoch
            cur = warmup_cosine(ep, lr, recipe.warmup_epochs, recipe.epochs, recipe.min_lr)
            for g in opt.param_groups:
                g["lr"] = cur * g.get("lr_scale", 1.0)
            x = norm(xb.to(device, non_blocking=True).float().div_(255))
            y = yb.to(device, non_blocking=True)
            if erase is not None:
                x = erase(x)
            if mix is not None:
                x, y = mix(x, y)
            with autocast_for(device):
                out = model(x)
            loss = criterion(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if ema is not None:
                _ema_update(ema, model, step)
            now = time.perf_counter()
            if log is not None and (now - last_log > 10 or step == total):
                last_loss = loss.item()
                log(f"{desc}: step {step}/{total} (epoch {ep:.2f}) loss {last_loss:.4f} "
                    f"lr {cur:.2e} {step * bs / (now - t0):.0f} img/s")
                last_log = now
    last_loss = loss.item()
    if not torch.isfinite(torch.tensor(last_loss)):
        raise NonFiniteLoss(f"{desc}: the fine-tune's loss is {last_loss} at step {step}; lower the learning rate")
    top1, top5 = evaluate_classifier(model, *val)
    res = dict(protocol=PROTOCOL, top1=top1, top5=top5, epochs=step / steps_per_epoch, steps=step,
               last_loss=last_loss, lr=lr, batch_size=bs, train_images=M,
               val_images=int(val[0].shape[0]), num_classes=num_classes,
               feature_dim=int(model.num_features), layer_decay=recipe.layer_decay)
    if ema is not None:
        e1, e5 = evaluate_classifier(ema.module, *val)
        res.update(ema_top1=e1, ema_top5=e5, ema_decay=recipe.ema_decay)
    res["seconds"] = time.perf_counter() - t0
    return res


def finetune(
    encoder: nn.Module,
    train: Arrays,
    val: Arrays,
    recipe: Optional[FinetuneRecipe] = None,
    *,
    num_classes: Optional[int] = None,
    log: Log = None,
    norm: Optional[Callable] = None,
    denorm: Optional[Callable] = None,
    desc: str = "finetune",
) -> dict:
    """Export `encoder` to timm, add a head, fine-tune. The encoder itself is left untouched."""
    recipe = recipe or recipe_for(encoder)
    C = num_classes or num_classes_of(train[1], val[1])
    model = build_finetune_model(encoder, C, recipe.drop_path, recipe.pool, recipe.seed, recipe.head_init_std,
                                 recipe.dropout)
    model = model.to(module_device(encoder))
    return finetune_model(model, train, val, recipe, num_classes=C, log=log, norm=norm,
                          denorm=denorm, desc=desc)
