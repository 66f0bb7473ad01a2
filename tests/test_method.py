"""The method seam: the registry is the only door, the batch travels whole, the method's state
nests in the checkpoint and older checkpoints still load."""

import re
from pathlib import Path

import pytest
import torch

from ldae_fast.batch import Batch
from ldae_fast.config import build_config
from ldae_fast.engine import checkpoint as ck
from ldae_fast.engine.loop import train
from ldae_fast.methods import METHODS, Method, build_method
from ldae_fast.methods.ldae import method as ldae_obj

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
    "data.img_size": "16", "data.batch_size": "4", "data.synthetic_images": "32", "tokenizer.fit_images": "16",
    "engine.kernels": "reference", "engine.log_every": "1", "engine.progress": "false",
    "eval.probe": "false", "eval.figure": "false",
}


def _cfg(tmp_path, **over):
    return build_config("demo", {**TINY, "engine.out_dir": str(tmp_path / "run"),
                                 **{k: str(v) for k, v in over.items()}})


def test_engine_eval_and_bench_name_no_concrete_method_or_tokenizer():
    concrete = re.compile(r"methods\.ldae|methods import .*LDAE|tokenizers\.(pca|pixel)|"
                          r"PCATokenizer|PixelTokenizer|LDAEMethod|fit_pca")
    bad = []
    for folder in ("ldae_fast/engine", "ldae_fast/eval", "bench"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if concrete.search(line):
                    bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "reach methods and tokenizers through their registries:\n" + "\n".join(bad)


def test_build_method_from_the_registry():
    cfg = build_config("demo", {"engine.kernels": "reference"})
    m = build_method(cfg, "cpu")
    assert isinstance(m, Method) and type(m).__name__ == "LDAEMethod" and METHODS["ldae"].name == m.name and m.kernels == "reference"
    with pytest.raises(RuntimeError, match="prepare"):
        m.state_dict()
    cfg.objective.method = "bogus"
    with pytest.raises(ValueError, match="objective.method='bogus'"):
        build_method(cfg, "cpu")


def test_the_batch_reaches_the_method_with_its_labels(tmp_path, monkeypatch):
    seen = []
    real = ldae_obj.LDAEMethod.__call__

    def spy(self, model, batch, step, *a, **kw):
        seen.append(batch)
        return real(self, model, batch, step, *a, **kw)

    monkeypatch.setattr(ldae_obj.LDAEMethod, "__call__", spy)
    train(_cfg(tmp_path, **{"engine.steps": 2}))
    assert len(seen) == 2 and all(isinstance(b, Batch) for b in seen)
    for b in seen:
        assert b.images.shape == (4, 3, 16, 16) and b.labels is not None
        assert b.labels.shape == (4,) and b.labels.dtype == torch.int64


def test_model_takes_conditioning_as_keywords():
    from ldae_fast.methods.ldae.model import build_model

    cfg = build_config("demo", TINY)
    model = build_model(cfg.model, cfg.ldae, 16)
    x, s = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert torch.equal(model(x, **{"sigma": s}), model(x, s))
    with pytest.raises(ValueError, match="no conditioning on label"):
        model(x, sigma=s, label=torch.zeros(2, dtype=torch.long))


def test_method_state_nests_under_one_key(tmp_path):
    over = {"engine.steps": 4, "engine.ckpt_every": 2}
    ref = train(_cfg(tmp_path / "a", **over))
    st = ck.load_state(ref.checkpoint)
    assert "tokenizer" not in st and set(st["method"]) == {"tokenizer"}
    assert torch.equal(st["method"]["tokenizer"]["tensors"]["basis"], ref.tokenizer.basis_full.cpu())

    # A format-2 checkpoint keeps the method's state whole: the eval reader rebuilds the method from it.
    from ldae_fast.eval.reader import load_for_eval

    _, _, method = load_for_eval(ref.checkpoint)
    assert torch.equal(method.tokenizer.basis_full, ref.tokenizer.basis_full.cpu())


def test_engine_kernels_reaches_the_models_kernels(tmp_path, monkeypatch):
    """--kernels reference --model.fused_adaln=true runs no Triton, in the model as in the method."""
    from ldae_fast.kernels import adaln_norm

    def fused(*a, **k):
        raise AssertionError("the fused adaLN kernel ran under engine.kernels=reference")

    monkeypatch.setattr(adaln_norm, "adaln_layernorm", fused)
    res = train(_cfg(tmp_path, **{"engine.steps": 1, "model.fused_adaln": "true"}))
    assert res.steps == 1
    assert not res.model.encoder.blocks[0].norm_modulate.on["cpu"]


def test_checkpoint_and_export_do_not_import_each_other():
    import ast

    def imported(path):
        names = set()
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or ""))
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    assert not {n for n in imported("ldae_fast/engine/checkpoint.py") if "export" in n or "eval" in n}
    assert not {n for n in imported("ldae_fast/eval/export.py") if "checkpoint" in n}


class _Spy(torch.nn.Module):
    """Records the network input; returns it unchanged."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x_in, sigma):
        self.inputs.append(x_in.detach().clone())
        return x_in


def _fitted_method(**over):
    from ldae_fast.tokenizers import prepare_tokenizer

    cfg = build_config("demo", {"engine.kernels": "reference", "tokenizer.fit_images": "64",
                                **{k: str(v) for k, v in over.items()}})
    imgs = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tok = prepare_tokenizer(cfg, lambda: iter([imgs]), log=lambda _: None)
    return build_method(cfg, "cpu", tokenizer=tok), imgs[:1].contiguous()


def test_input_scaling_divides_by_the_signal_plus_noise_scale():
    plain, x = _fitted_method()
    scaled, _ = _fitted_method(**{"noise.input_scaling": "true"})
    a, b = plain.add_noise(x, 3), scaled.add_noise(x, 3)
    torch.testing.assert_close(b.sigma, a.sigma)
    k = (a.gamma.square() + a.sigma.square()).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(b.x_in * k, a.x_in)
    assert not torch.allclose(b.x_in, a.x_in)


@pytest.mark.parametrize("schedule", ["linear_gamma2", "ddpm_linear_beta", "sigma_linear"])
def test_figure_shows_the_input_training_gives_the_network(schedule):
    """The figure's noisy column is the training input at the same sigma and noise draw: the
    schedule's gamma and noise.input_scaling included (a VP schedule has gamma = sqrt(1 - sigma^2),
    not the final recipe's 1)."""
    from ldae_fast.methods.ldae.figure import denoise_columns

    method, x = _fitted_method(**{"noise.schedule": schedule, "noise.input_scaling": "true"})
    nb = method.add_noise(x, 3, t=torch.tensor([0.6]))
    spy = _Spy()
    cols = denoise_columns(spy, method, x, [float(nb.sigma[0])], step=3)
    assert len(cols) == 3 and torch.equal(cols[1], spy.inputs[0])
    # gamma is recomputed from a float32 sigma: near sigma = 1 that costs a few 1e-5 of z0.
    torch.testing.assert_close(cols[1], nb.x_in, rtol=1e-4, atol=1e-4)
    if schedule != "sigma_linear":
        unit = method.noisy_input(x, torch.ones(1), nb.sigma, 3)  # gamma = 1 whatever the schedule
        assert not torch.allclose(unit, nb.x_in, rtol=1e-3, atol=1e-3)
