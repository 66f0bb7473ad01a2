"""models/: shapes and parameter counts per size, conditioning, checkpointing, timm export, FLOPs."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ldae_fast.config import MODEL_SIZES, ModelConfig
from ldae_fast.methods.ldae import model as ldae_model
from ldae_fast.methods.ldae.config import LDAEConfig
from ldae_fast.models import sincos_2d, timm_kwargs, timm_state_dict

IMG, P = 16, 4  # 16 patches + class token: every real-compute test stays in milliseconds


# The shared halves in l-DAE's default layout ('mae'); tests/test_dit_layout.py covers 'dit'.
# A network here is (the shared model section, l-DAE's section); a bare ModelConfig takes l-DAE's defaults.
Net = tuple[ModelConfig, LDAEConfig]


def _net(m: ModelConfig | Net) -> Net:
    return m if isinstance(m, tuple) else (m, LDAEConfig())


def build_model(m: ModelConfig | Net, *a, **k):
    return ldae_model.build_model(*_net(m), *a, **k)


def flops_per_image(m: ModelConfig | Net, *a, **k) -> float:
    return ldae_model.flops_per_image(*_net(m), *a, **k)


def param_count(m: ModelConfig | Net, *a, **k) -> dict[str, int]:
    return ldae_model.param_count(*_net(m), *a, **k)


def net(cond: str = "adaln", **kw) -> Net:
    """A model section and l-DAE's section with its noise conditioning `cond`."""
    return ModelConfig(**kw), LDAEConfig(cond=cond)


def tiny_cfg(**kw) -> Net:
    base = dict(size="tiny", patch_size=P, encoder_depth=2, decoder_depth=2)
    base.update(kw)
    return net(**base)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its init: zero-init (adaLN-Zero, final layer) hides most bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def images(b=2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, IMG, IMG, generator=g).to(device)


@pytest.mark.parametrize("size", list(MODEL_SIZES))
@pytest.mark.parametrize("cond", ["adaln", "none"])
def test_every_size_shapes_and_param_count(size, cond):
    # Meta tensors: no memory and no compute, so building ViT-L costs nothing.
    cfg = net(size=size, patch_size=16, cond=cond)
    with torch.device("meta"):
        model = build_model(cfg, img_size=32)
    counts = param_count(cfg, 32)
    assert sum(p.numel() for p in model.encoder.parameters()) == counts["encoder"]
    assert sum(p.numel() for p in model.decoder.parameters()) == counts["decoder"]
    assert len(model.encoder.blocks) == MODEL_SIZES[size]["encoder_depth"]
    assert len(model.decoder.blocks) == MODEL_SIZES[size]["decoder_depth"]
    w = MODEL_SIZES[size]["width"]
    assert model.encoder.num_features == w and model.patch_size == 16 and model.img_size == 32

    # Shapes through the size's width and heads; one block per side, since meta ops still cost
    # Python dispatch time and every block maps shapes the same way.
    shallow = net(size=size, patch_size=16, cond=cond, encoder_depth=1, decoder_depth=1)
    with torch.device("meta"):
        model = build_model(shallow, img_size=32)
    x = torch.empty(3, 3, 32, 32, device="meta")
    out = model(x, torch.empty(3, device="meta"))
    feats = model.encoder.forward_features(x)
    assert out.shape == x.shape
    assert feats.shape == (3, 1 + 4, w)
    assert model.encoder.pooled(x, "avg").shape == (3, w)
    assert model.encoder.pooled(x, "cls").shape == (3, w)


def test_param_count_matches_timm_vit_b():
    # 85,798,656: timm's ViT-B/16 at 224 without head; its learned pos_embed (197 x 768) is a
    # parameter there and a fixed buffer here.
    enc = param_count(net(size="B", patch_size=16, cond="none"), 224)["encoder"]
    assert enc + 197 * 768 == 85_798_656


@pytest.mark.parametrize("cond", ["adaln", "none"])
def test_forward_real(cond, device):
    model = build_model(tiny_cfg(cond=cond), IMG).to(device)
    x = images(device=device)
    out = model(x, torch.tensor([0.0, 1.0], device=device))
    assert out.shape == x.shape and out.dtype == x.dtype
    # Zero-initialised output layer (DiT): the untrained model predicts exactly zero.
    assert torch.count_nonzero(out) == 0
    out = perturbed(model)(x, torch.tensor([0.3, 1.2], device=device))
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_adaln_zero_init():
    model = build_model(tiny_cfg(), IMG)
    for blk in [*model.encoder.blocks, *model.decoder.blocks]:
        assert torch.count_nonzero(blk.adaLN_modulation[-1].weight) == 0
        assert blk.norm1.weight is None  # adaLN replaces the LayerNorm affine
    # Identity blocks at init: encoder features are the normalised embeddings for any sigma.
    x = images()
    torch.testing.assert_close(model.encoder.forward_features(x, torch.tensor([0.0, 1.4])),
                               model.encoder.forward_features(x), atol=0, rtol=0)
    plain = build_model(tiny_cfg(cond="none"), IMG)
    assert plain.encoder.blocks[0].norm1.weight is not None
    assert not hasattr(plain.encoder.blocks[0], "adaLN_modulation")
    assert plain.encoder.sigma_embed is None and plain.decoder.sigma_embed is None


@pytest.mark.parametrize("cond", ["adaln", "none"])
def test_sigma_conditioning(cond):
    model = perturbed(build_model(tiny_cfg(cond=cond), IMG)).eval()
    x = images()
    with torch.no_grad():
        a = model(x, torch.tensor([0.1, 0.1]))
        b = model(x, torch.tensor([0.1, 0.9]))
        fa = model.encoder.forward_features(x, torch.tensor([0.1, 0.1]))
        fb = model.encoder.forward_features(x, torch.tensor([0.1, 0.9]))
    # Sample 0 keeps its sigma: per-sample conditioning must not leak across the batch.
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    if cond == "adaln":
        assert (a[1] - b[1]).abs().max() > 1e-3
        assert (fa[1] - fb[1]).abs().max() > 1e-3
    else:
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(fa, fb, atol=0, rtol=0)


def test_sigma_forms():
    enc = perturbed(build_model(tiny_cfg(), IMG)).encoder
    x = images()
    with torch.no_grad():
        ref = enc.forward_features(x, torch.zeros(2))
        torch.testing.assert_close(enc.forward_features(x), ref, atol=0, rtol=0)
        torch.testing.assert_close(enc.forward_features(x, 0.0), ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="sigma"):
        enc.forward_features(x, torch.zeros(3))


def test_pos_embed_fixed_sincos():
    model = build_model(tiny_cfg(), IMG)
    enc = model.encoder
    names = {n for n, _ in model.named_parameters()}
    assert "encoder.pos_embed" not in names and "decoder.pos_embed" not in names
    assert "encoder.pos_embed" not in model.state_dict()
    pe = enc.pos_embed[0]
    w, g = pe.shape[1], IMG // P
    assert pe.shape == (1 + g * g, w)
    assert torch.count_nonzero(pe[0]) == 0  # class token: no position (MAE)
    # Patch (row 1, col 2): first half encodes the column, second half the row.
    tok = pe[1 + 1 * g + 2]
    i = 3
    omega = 10000.0 ** (-i / (w // 4))
    assert tok[i].item() == pytest.approx(math.sin(2 * omega), abs=1e-6)
    assert tok[w // 4 + i].item() == pytest.approx(math.cos(2 * omega), abs=1e-6)
    assert tok[w // 2 + i].item() == pytest.approx(math.sin(1 * omega), abs=1e-6)
    torch.testing.assert_close(model.decoder.pos_embed, enc.pos_embed)
    with pytest.raises(ValueError):
        sincos_2d(6, 2, 2)


def test_grad_checkpointing_same_gradients():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = perturbed(build_model(cfg, IMG))
    x, sigma = images(), torch.tensor([0.2, 1.1])

    def grads(enable):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enable)
        model(x, sigma).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g0, g1 = grads(False), grads(True)
    assert model.grad_checkpointing and model.decoder.grad_checkpointing
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)
    assert build_model(tiny_cfg(grad_checkpointing=True), IMG).grad_checkpointing


def _saved_bytes(model, x, sigma) -> int:
    """Bytes of non-parameter tensors autograd keeps for the backward of one forward."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, sigma).square().mean().backward()
    return total


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-blocks"])
def test_grad_checkpointing_keeps_fewer_activations(compiled):
    """Checkpointing must actually drop the blocks' activations, also when the blocks are
    compiled (the checkpoint is traced inside each compiled block), and leave gradients alone."""
    from ldae_fast.models.compile import compile_blocks

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = perturbed(build_model(tiny_cfg(encoder_depth=3, decoder_depth=3), IMG))
    if compiled:
        compile_blocks(model)
    x, sigma = torch.randn(8, 3, IMG, IMG), torch.rand(8)
    out = {}
    for enable in (False, True):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enable)
        if compiled:  # compile outside the hooks: the measured call reuses the graph
            model(x, sigma).square().mean().backward()
            model.zero_grad(set_to_none=True)
        kept = _saved_bytes(model, x, sigma)
        out[enable] = kept, {n: p.grad.clone() for n, p in model.named_parameters()}
    (full, g0), (ckpt, g1) = out[False], out[True]
    # Without checkpointing each block keeps several (B, T, width) activations; with it, about
    # one input per block.
    assert ckpt < 0.5 * full, (ckpt, full)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)
    torch._dynamo.reset()


def test_attention_backend_from_config():
    x, sigma = images(), torch.tensor([0.2, 1.1])
    outs = []
    for backend in ("math", "sdpa", "auto"):
        torch.manual_seed(0)
        model = perturbed(build_model(tiny_cfg(attn_backend=backend), IMG))
        assert model.encoder.blocks[0].attn.backend == ("sdpa" if backend == "auto" else backend)
        with torch.no_grad():
            outs.append(model(x, sigma))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_encoder_names_are_timm_names():
    timm = pytest.importorskip("timm")
    enc = build_model(tiny_cfg(cond="none"), IMG).encoder
    tm = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_kwargs(enc))
    ours = set(enc.state_dict()) | {"pos_embed"}
    assert ours == set(tm.state_dict())


@pytest.mark.parametrize("cond", ["adaln", "none"])
@pytest.mark.parametrize("pool", ["avg", "token"])
def test_timm_export_loads_strictly_and_matches(cond, pool):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    enc = perturbed(build_model(tiny_cfg(cond=cond), IMG), seed=3).encoder.eval()
    tm = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_kwargs(enc, pool)).eval()
    tm.load_state_dict(timm_state_dict(enc), strict=True)
    x = images(b=3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(tm.forward_features(x), enc.forward_features(x), atol=1e-5, rtol=1e-5)
        ours = enc.pooled(x, "avg" if pool == "avg" else "cls")
        torch.testing.assert_close(tm(x), ours, atol=1e-5, rtol=1e-5)


def test_timm_export_folds_nonzero_sigma():
    timm = pytest.importorskip("timm")
    enc = perturbed(build_model(tiny_cfg(), IMG), seed=4).encoder.eval()
    tm = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_kwargs(enc)).eval()
    tm.load_state_dict(timm_state_dict(enc, sigma=0.7), strict=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(tm.forward_features(x), enc.forward_features(x, 0.7), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cond", ["adaln", "none"])
def test_flops_formula_counts_every_matmul(cond):
    # The math backend runs attention as two visible matmuls, so the counter sees all of them.
    cfg = tiny_cfg(cond=cond, attn_backend="math", encoder_depth=2, decoder_depth=1)
    model = build_model(cfg, IMG)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images(b=2), torch.tensor([0.1, 0.2]))
    assert counter.get_total_flops() / 2 == flops_per_image(cfg, IMG)


def test_flops_formula_matches_the_paper_form():
    cfg = net(size="B", patch_size=16, cond="none")
    N, w, L = (224 // 16) ** 2, 768, 24
    T = N + 1
    blocks = L * T * (24 * w * w + 4 * T * w)
    extras = 2 * N * 768 * w + 2 * T * w * w + 2 * N * w * 768
    assert flops_per_image(cfg, 224) == blocks + extras


def test_bf16_autocast_forward():
    model = perturbed(build_model(tiny_cfg(), IMG))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(), torch.tensor([0.2, 1.1]))
    assert out.shape == (2, 3, IMG, IMG) and torch.isfinite(out).all()


def test_bad_image_size():
    with pytest.raises(ValueError, match="divisible"):
        build_model(tiny_cfg(), 18)
    model = build_model(tiny_cfg(), IMG)
    with pytest.raises(ValueError, match="built for"):
        model(torch.zeros(1, 3, 2 * IMG, 2 * IMG), torch.zeros(1))


def test_compile_blocks_regional_with_mode(monkeypatch):
    """Every block of both halves is compiled with the mode asked for (inductor only: the other
    backends take no mode), and nothing outside the blocks is."""
    from ldae_fast.models.compile import compile_blocks

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, kw)))
    model = build_model(ModelConfig(size="tiny", encoder_depth=2, decoder_depth=3), 16)
    assert compile_blocks(model, mode="reduce-overhead") == 5
    assert seen == [("Block", {"backend": "inductor", "mode": "reduce-overhead"})] * 5
    seen.clear()
    compile_blocks(model, backend="aot_eager", mode="reduce-overhead")
    assert seen == [("Block", {"backend": "aot_eager"})] * 5


@pytest.mark.parametrize("amp", [False, True])
def test_fused_adaln_model_matches_unfused(kernel_device, amp):
    """model.fused_adaln swaps LayerNorm + modulate for the Triton kernel (interpreted on CPU)
    in every block and the final layer: same outputs and gradients, parameters untouched."""
    from ldae_fast.kernels import adaln_norm

    device = kernel_device
    plain = perturbed(build_model(tiny_cfg(), IMG)).to(device)
    fused = build_model(tiny_cfg(fused_adaln=True), IMG, kernels="triton").to(device)
    assert fused.decoder.final_layer.norm_modulate.on[torch.device(device).type], "the kernel must run here"
    fused.load_state_dict(plain.state_dict())
    calls = []
    real = adaln_norm.adaln_layernorm
    blocks_calls = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    x, sigma = images(device=device), torch.tensor([0.3, 1.2], device=device)
    outs, grads = [], []
    for m in (plain, fused):
        m.zero_grad()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(adaln_norm, "adaln_layernorm", blocks_calls)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
                y = m(x, sigma)
        y.float().square().mean().backward()
        outs.append(y.float())
        grads.append({k: p.grad.float() for k, p in m.named_parameters() if p.grad is not None})
    # 2 + 2 blocks x 2 norms + the final layer, all through the kernel; none for the plain model.
    assert len(calls) == 9
    tol = dict(rtol=3e-2, atol=3e-2) if amp else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], **tol, msg=k)


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_fused_adaln_honours_engine_kernels(kernels, monkeypatch):
    """model.fused_adaln asks for the kernel; engine.kernels decides: 'reference' (and 'auto' on
    CPU, as for the noise and the loss) runs the reference path in every modulated norm, even
    where the kernel could run (TRITON_INTERPRET=1 here)."""
    from ldae_fast.kernels import adaln_norm, modules

    fused_calls, ref_calls = [], []
    real_ref = modules.adaln_reference
    monkeypatch.setattr(adaln_norm, "adaln_layernorm", lambda *a, **k: fused_calls.append(1))
    monkeypatch.setattr(modules, "adaln_reference", lambda *a: ref_calls.append(1) or real_ref(*a))
    model = build_model(tiny_cfg(fused_adaln=True), IMG, kernels=kernels)
    model(images(), torch.tensor([0.3, 1.2]))
    assert fused_calls == [] and len(ref_calls) == 9  # 2 + 2 blocks x 2 norms + the final layer


def test_fused_adaln_blocks_compile_without_graph_breaks(kernel_device, monkeypatch):
    """The regional compile of training (one torch.compile per block) traces through the fused
    op: fullgraph=True fails on any graph break, and the op is what runs."""
    from ldae_fast.kernels import adaln_norm

    torch._dynamo.reset()
    model = perturbed(build_model(tiny_cfg(fused_adaln=True), IMG, kernels="triton")).to(kernel_device)
    x, sigma = images(device=kernel_device), torch.tensor([0.3, 1.2], device=kernel_device)
    want = model(x, sigma)
    calls = []
    real = torch.ops.ldae.adaln_layernorm_fwd
    monkeypatch.setattr(adaln_norm, "_fwd_op", lambda *a: calls.append(1) or real(*a))
    for blk in [*model.encoder.blocks, *model.decoder.blocks]:
        blk.compile(backend="eager", fullgraph=True)
    torch.testing.assert_close(model(x, sigma), want)
    assert len(calls) == 9  # 4 blocks x 2 norms + the final layer (not compiled)
    torch._dynamo.reset()


def test_compile_blocks_makes_room_for_per_instance_graphs(monkeypatch):
    """torch < 2.5 compiles one graph per block instance: the cache limit must fit them all, or
    blocks past the 8th silently run eager. Newer torch shares one graph: nothing is touched."""
    from ldae_fast.models import compile as comp

    cfg = torch._dynamo.config
    # Saved and restored by hand: the config module serves these names through __getattr__ (and
    # newer torch aliases one), so monkeypatch's undo would delete them for the rest of the run.
    names = ("cache_size_limit", "accumulated_cache_size_limit")
    saved = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: None)
    try:
        cfg.cache_size_limit = 8
        model = build_model(ModelConfig(size="tiny", encoder_depth=12, decoder_depth=12), 16)
        monkeypatch.setattr(comp, "_torch_version", lambda: (2, 4))
        assert comp.compile_blocks(model) == 24
        assert cfg.cache_size_limit >= 48
        cfg.cache_size_limit = 8
        monkeypatch.setattr(comp, "_torch_version", lambda: (2, 5))
        comp.compile_blocks(model)
        assert cfg.cache_size_limit == 8
    finally:
        for n, v in saved.items():
            setattr(cfg, n, v)
    monkeypatch.undo()
    assert comp._torch_version() >= (2, 4)  # the real parse works on this torch


def test_ldae_state_dict_names_and_shapes_are_those_checkpoints_were_written_with():
    """tests/assets/ldae_state_dict_keys.json holds the state_dict names and shapes l-DAE's network
    had when it lived in models/vit.py: checkpoints and timm exports written then still load."""
    import json
    from pathlib import Path

    from ldae_fast.config import build_config
    from ldae_fast.methods import build_model as build_method_model

    want = json.loads((Path(__file__).parent / "assets" / "ldae_state_dict_keys.json").read_text())
    for case, shapes in want.items():
        layout, cls = (part.split("=")[1] for part in case.split(","))
        cfg = build_config("demo", {"model.layout": layout, "model.class_cond": cls,  # the spelling of then
                                    "data.num_classes": "10" if cls == "true" else "0"})
        with torch.device("meta"):
            got = {k: list(v.shape) for k, v in build_method_model(cfg).state_dict().items()}
        assert got == shapes, case
