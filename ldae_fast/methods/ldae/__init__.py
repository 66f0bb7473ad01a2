"""l-DAE (Chen, Liu, Xie, He): denoise a latent noised through a tokenizer, reconstruct the image."""

from __future__ import annotations

from ..spec import MethodSpec
from .presets import PRESETS


def _method(cfg, device, **kw):
    from .method import LDAEMethod
    return LDAEMethod(cfg, device, **kw)


def _model(cfg, kernels: str = "auto"):
    from ...models.vit import build_model
    return build_model(cfg.model, cfg.data.img_size, kernels=kernels)


def _flops(cfg) -> tuple[float, float]:
    from .flops import train_flops_per_image
    return train_flops_per_image(cfg.model, cfg.data.img_size)


def _params(cfg) -> dict[str, int]:
    from ...models.vit import param_count
    return param_count(cfg.model, cfg.data.img_size)


def _figure(*args, **kw):
    from .figure import method_figure
    return method_figure(*args, **kw)


def _probe_view(encoder, cfg, method=None):
    from .probe import probe_view
    return probe_view(encoder, cfg, method)


def _probe_sigma(cfg) -> float:
    from .probe import probe_sigma
    return probe_sigma(cfg)


def _probe_note(cfg) -> str:
    from .probe import probe_note
    return probe_note(cfg)


def _paper_probe_sweep(cfg) -> dict:
    from .probe import paper_probe_sweep
    return paper_probe_sweep(cfg)


def _rows():
    from .trajectory import ROWS
    return ROWS


SPEC = MethodSpec(name="ldae", title="l-DAE", presets=PRESETS, build_method=_method, build_model=_model, train_flops=_flops,
                  param_count=_params, figure=_figure, probe_view=_probe_view, probe_note=_probe_note,
                  probe_sigma=_probe_sigma, paper_probe_sweep=_paper_probe_sweep,
                  rows=_rows)
