"""DiffMAE (Wei et al.): a masked encoder, a decoder that denoises the hidden patches."""

from __future__ import annotations

from ..spec import MethodSpec, encoder_decoder_params, unconditioned_note
from .config import RENAMED, TOOK_OVER, DiffMAEConfig
from .presets import PRESETS


def _method(cfg, device, **kw):
    from .method import DiffMAEMethod
    return DiffMAEMethod(cfg, device, **kw)


def _model(cfg, kernels: str = "auto"):
    from .model import build_diffmae
    return build_diffmae(cfg.model, cfg.diffmae, cfg.data.img_size, kernels=kernels)


def _flops(cfg) -> tuple[float, float]:
    from .flops import diffmae_train_flops_per_image
    # The masked encoder's cost follows the run's own mask ratio.
    return diffmae_train_flops_per_image(cfg.model, cfg.diffmae, cfg.data.img_size)


def _params(cfg) -> dict[str, int]:
    from .model import build_diffmae
    return encoder_decoder_params(lambda: build_diffmae(cfg.model, cfg.diffmae, cfg.data.img_size))


def _figure(*args, **kw):
    from .figure import method_figure
    return method_figure(*args, **kw)


def _probe_view(encoder, cfg, method=None):
    from ..probe import unconditioned_view
    return unconditioned_view(encoder, cfg, method)


def _finetune_recipes():
    # Supplement Table 1b, as eval.finetune.FinetuneRecipe fields. Its Kinetics column (ViT-L,
    # 'video:L'): batch 128, blr 3.2e-3, layer decay 0.75, 50 epochs, drop path 0.2, dropout 0.5,
    # repeated augmentation 2; the rest as the image columns.
    from .finetune import DIFFMAE_FINETUNE
    kinetics = {**DIFFMAE_FINETUNE["L"], "batch_size": 128, "blr": 3.2e-3, "layer_decay": 0.75,
                "epochs": 50, "drop_path": 0.2, "dropout": 0.5, "repeated_aug": 2}
    return {**DIFFMAE_FINETUNE, "video:L": kinetics}


def _validate(cfg) -> None:
    from ...config import ConfigError

    dm, frames = cfg.diffmae, cfg.data.num_frames
    if dm.sample_steps > dm.num_timesteps:
        raise ConfigError(f"diffmae.sample_steps={dm.sample_steps} exceeds diffmae.num_timesteps={dm.num_timesteps}")
    if frames and frames % dm.tubelet:
        raise ConfigError(f"data.num_frames={frames} is not a multiple of diffmae.tubelet={dm.tubelet}")
    if not frames and dm.tubelet != 1:
        raise ConfigError(f"diffmae.tubelet={dm.tubelet} needs video data (data.num_frames >= 1)")
    if dm.time_slice >= dm.tubelet:
        raise ConfigError(f"diffmae.time_slice={dm.time_slice} must lie in 0..diffmae.tubelet-1={dm.tubelet - 1}")


def _step_bench():
    from .bench import step_bench
    return step_bench()


SPEC = MethodSpec(name="diffmae", title="DiffMAE", presets=PRESETS, build_method=_method, build_model=_model,
                  train_flops=_flops, param_count=_params, figure=_figure, probe_view=_probe_view,
                  probe_note=unconditioned_note, validate=_validate, video=True,
                  shape_fields=((("diffmae", "decoder_kind"), "joint"), (("diffmae", "decoder_topdown"), "last"),
                                (("model", "decoder_width"), 0), (("model", "decoder_heads"), 0)),
                  finetune_recipes=_finetune_recipes, finetune_source="DiffMAE supplement Table 1b",
                  sections={"diffmae": DiffMAEConfig}, renamed=RENAMED, took_over=TOOK_OVER,
                  step_bench=_step_bench)
