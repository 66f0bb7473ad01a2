"""MAE (He et al.): a masked encoder and a light decoder that predicts the hidden pixels."""

from __future__ import annotations

from ..spec import MethodSpec, encoder_decoder_params, unconditioned_note
from .config import RENAMED, MAEConfig
from .presets import PRESETS


def _method(cfg, device, **kw):
    from .method import MAEMethod
    return MAEMethod(cfg, device, **kw)


def _model(cfg, kernels: str = "auto"):
    from .model import build_mae
    return build_mae(cfg.model, cfg.data.img_size, kernels=kernels)


def _flops(cfg) -> tuple[float, float]:
    from .model import train_flops_per_image
    return train_flops_per_image(cfg.model, cfg.data.img_size, cfg.mae.mask_ratio)


def _params(cfg) -> dict[str, int]:
    from .model import build_mae
    return encoder_decoder_params(lambda: build_mae(cfg.model, cfg.data.img_size))


def _figure(*args, **kw):
    from .figure import method_figure
    return method_figure(*args, **kw)


def _probe_view(encoder, cfg, method=None):
    from ..probe import unconditioned_view
    return unconditioned_view(encoder, cfg, method)


def _finetune_recipes():
    from .finetune import MAE_FINETUNE
    return MAE_FINETUNE


def _step_bench():
    from .bench import step_bench
    return step_bench()


SPEC = MethodSpec(name="mae", title="MAE", presets=PRESETS, build_method=_method, build_model=_model,
                  train_flops=_flops, param_count=_params, figure=_figure, probe_view=_probe_view,
                  probe_note=unconditioned_note,
                  shape_fields=((("model", "decoder_width"), 0), (("model", "decoder_heads"), 0)),
                  sections={"mae": MAEConfig}, renamed=RENAMED, step_bench=_step_bench,
                  finetune_recipes=_finetune_recipes, finetune_source="MAE's fine-tuning recipe (He et al. 2022)")
