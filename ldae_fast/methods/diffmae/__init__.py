"""DiffMAE (Wei et al.): a masked encoder, a decoder that denoises the hidden patches."""

from __future__ import annotations

from ..spec import MethodSpec, encoder_decoder_params, unconditioned_note
from .presets import PRESETS


def _method(cfg, device, **kw):
    from .method import DiffMAEMethod
    return DiffMAEMethod(cfg, device, **kw)


def _model(cfg, kernels: str = "auto"):
    from .model import build_diffmae
    return build_diffmae(cfg.model, cfg.data.img_size, kernels=kernels)


def _flops(cfg) -> tuple[float, float]:
    from .flops import diffmae_train_flops_per_image
    # The masked encoder's cost follows the run's own mask ratio.
    return diffmae_train_flops_per_image(cfg.model, cfg.data.img_size, cfg.objective.mask_ratio)


def _params(cfg) -> dict[str, int]:
    from .model import build_diffmae
    return encoder_decoder_params(lambda: build_diffmae(cfg.model, cfg.data.img_size))


def _figure(*args, **kw):
    from .figure import method_figure
    return method_figure(*args, **kw)


def _probe_view(encoder, cfg, method=None):
    from ..probe import unconditioned_view
    return unconditioned_view(encoder, cfg, method)


def _finetune_recipes():
    # Supplement Table 1b; config.py keeps the table (its fine-tuning fields are eval's). Its
    # Kinetics column (ViT-L, 'video:L'): batch 128, blr 3.2e-3, layer decay 0.75, 50 epochs,
    # drop path 0.2, dropout 0.5, repeated augmentation 2; the rest as the image columns.
    from ...config import DIFFMAE_FINETUNE
    kinetics = {**DIFFMAE_FINETUNE["L"], "batch_size": 128, "blr": 3.2e-3, "layer_decay": 0.75,
                "epochs": 50, "drop_path": 0.2, "dropout": 0.5, "repeated_aug": 2}
    return {**DIFFMAE_FINETUNE, "video:L": kinetics}


def _validate(cfg) -> None:
    from ...config import ConfigError

    m = cfg.model
    if m.layout != "mae":
        raise ConfigError(f"model.layout={m.layout!r} is a layout of l-DAE's encoder-decoder; "
                          "objective.method='diffmae' has its own (leave model.layout at 'mae')")
    # model.width is accepted too: it is what versions that wrote the resolved width back stored
    # for every DiffMAE run, and those configs must still load.
    if m.adaln_dim not in (0, m.width):
        raise ConfigError(f"model.adaln_dim={m.adaln_dim} sets l-DAE's conditioning width; "
                          "objective.method='diffmae' conditions its blocks at their own width "
                          "(leave model.adaln_dim at 0)")


SPEC = MethodSpec(name="diffmae", title="DiffMAE", presets=PRESETS, build_method=_method, build_model=_model,
                  train_flops=_flops, param_count=_params, figure=_figure, probe_view=_probe_view,
                  probe_note=unconditioned_note, validate=_validate, video=True,
                  shape_fields=((("model", "decoder_kind"), "joint"), (("model", "decoder_topdown"), "last"),
                                (("model", "decoder_width"), 0), (("model", "decoder_heads"), 0)),
                  finetune_recipes=_finetune_recipes)
