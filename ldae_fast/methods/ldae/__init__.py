"""l-DAE (Chen, Liu, Xie, He): denoise a latent noised through a tokenizer, reconstruct the image."""

from __future__ import annotations

from ..spec import MethodSpec
from .config import RENAMED, LDAEConfig, NoiseConfig, cond_width
from .presets import PRESETS


def _method(cfg, device, **kw):
    from .method import LDAEMethod
    return LDAEMethod(cfg, device, **kw)


def _model(cfg, kernels: str = "auto"):
    from .model import build_model
    return build_model(cfg.model, cfg.ldae, cfg.data.img_size, kernels=kernels)


def _flops(cfg) -> tuple[float, float]:
    from .flops import train_flops_per_image
    return train_flops_per_image(cfg.model, cfg.ldae, cfg.data.img_size)


def _params(cfg) -> dict[str, int]:
    from .model import param_count
    return param_count(cfg.model, cfg.ldae, cfg.data.img_size)


def _validate(cfg) -> None:
    from ...config import ConfigError

    if cond_width(cfg.model.width, cfg.ldae) < 1:
        raise ConfigError(f"ldae.adaln_dim={cfg.ldae.adaln_dim}: width/4 is 0 for model.width={cfg.model.width}")
    net, m = cfg.ldae, cfg.model
    if net.output == "latent" and cfg.noise.target == "x0":
        raise ConfigError("noise.target='x0' (the original image) needs ldae.output='image'; a latent output "
                          "predicts noise.target='z0' or 'eps'")
    if "latent" in (net.input, net.output) and m.latent_dim != cfg.tokenizer.latent_dim:
        raise ConfigError(f"model.latent_dim={m.latent_dim} differs from tokenizer.latent_dim="
                          f"{cfg.tokenizer.latent_dim}; leave it at 0")
    if net.class_cond and m.num_classes < 2:
        raise ConfigError("ldae.class_cond needs model.num_classes (or data.num_classes) >= 2: the number of "
                          "classes of the labelled data")


def _model_links(cfg) -> frozenset[str]:
    net = cfg.ldae
    return frozenset({*(("latent_dim",) if "latent" in (net.input, net.output) else ()),
                      *(("num_classes",) if net.class_cond else ())})


def _probe_blocks(cfg) -> tuple[int, str]:
    # 'dit' is one DiT cut in two: the probe may read past the cut (l-DAE App. A, k = 9..15 of 24).
    m = cfg.model
    if cfg.ldae.layout == "dit":
        return m.encoder_depth + m.decoder_depth, "model.encoder_depth + model.decoder_depth with ldae.layout=dit"
    return m.encoder_depth, "model.encoder_depth"


def _resolved(cfg) -> dict:
    return {"ldae.adaln_dim": cond_width(cfg.model.width, cfg.ldae)}


def _figure(*args, **kw):
    from .figure import method_figure
    return method_figure(*args, **kw)


def _probe_view(encoder, cfg, method=None):
    from .probe import probe_view
    return probe_view(encoder, cfg, method)


def _probe_encoder(model, cfg):
    from .probe import probe_encoder
    return probe_encoder(model, cfg)


def _finetune_recipes():
    from .finetune import LDAE_FINETUNE
    return LDAE_FINETUNE


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


def _step_bench():
    from .bench import step_bench
    return step_bench()


SPEC = MethodSpec(name="ldae", title="l-DAE", presets=PRESETS, build_method=_method, build_model=_model, train_flops=_flops,
                  param_count=_params, figure=_figure, probe_view=_probe_view, probe_note=_probe_note,
                  probe_sigma=_probe_sigma, probe_conditioned=True, paper_probe_sweep=_paper_probe_sweep,
                  rows=_rows, sections={"noise": NoiseConfig, "ldae": LDAEConfig}, renamed=RENAMED,
                  validate=_validate, probe_blocks=_probe_blocks, probe_encoder=_probe_encoder, resolved=_resolved,
                  finetune_recipes=_finetune_recipes, finetune_source="l-DAE App. B",
                  shape_fields=((("ldae", "layout"), "mae"), (("ldae", "adaln_dim"), 0), (("ldae", "cond"), "adaln"),
                                (("ldae", "class_cond"), False), (("ldae", "input"), "image"),
                                (("ldae", "output"), "image")),
                  model_links=_model_links, step_bench=_step_bench)
