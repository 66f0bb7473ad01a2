"""The speed switches (models/speed.py, the adaLN kernel's out_dtype, engine/cuda_graph.py), each
off by default and each checked for numerics against the path it replaces. On CPU: bf16 autocast
and the Triton interpreter; on a GPU (LDAE_GPU_TESTS=1, gpu_check's test stage) the same tests
run compiled where a `kernel_device` / `device` leg is cuda."""

import pytest
import torch
import torch.nn.functional as F

from ldae_fast import reference
from ldae_fast.config import ConfigError, ModelConfig
from ldae_fast.kernels import adaln_norm
from ldae_fast.methods.ldae.config import LDAEConfig
from ldae_fast.methods.ldae.model import build_model
from ldae_fast.models import speed

IMG = 16


def cfg(layout="dit", **kw):
    """(model section, l-DAE's section): build_model(*cfg(...), IMG)."""
    return (ModelConfig(**{"size": "tiny", "patch_size": 4, "encoder_depth": 2, "decoder_depth": 2, **kw}),
            LDAEConfig(layout=layout))


def perturbed(model, seed=0):
    """adaLN-Zero and the zero head start as the identity / zeros: give every weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _run(model, device, amp, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, IMG, IMG, generator=g).to(device)
    sigma = torch.tensor([0.3, 1.1], device=device)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        out = model(x, sigma=sigma)
    # The loss outside autocast, in float32, as the methods compute it.
    loss = (out.float() - x).square().mean()
    loss.backward()
    return out.float().detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _block_input_dtypes(model, device, amp):
    seen = []
    hooks = [blk.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
             for stack in speed.stacks(model) for blk in stack]
    _run(model, device, amp)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("layout", ["dit", "mae"])
def test_bf16_residual_stream_matches_the_float32_stream(device, layout):
    """model.bf16_residual: under bf16 autocast every block reads and returns bfloat16 (float32
    without the switch), the output and every gradient stay within bf16 rounding of the float32
    stream's, and without autocast it changes nothing at all."""
    base = perturbed(build_model(*cfg(layout=layout), IMG)).to(device)
    fast = perturbed(build_model(*cfg(layout=layout, bf16_residual=True), IMG)).to(device)
    assert {i for i, _ in _block_input_dtypes(base, device, True)} == {torch.float32}
    assert set(_block_input_dtypes(fast, device, True)) == {(torch.bfloat16, torch.bfloat16)}

    out_b, grads_b = _run(base, device, True)
    out_f, grads_f = _run(fast, device, True)
    # Yardstick: the float32-stream bf16 run against a full float32 run.
    out_32, grads_32 = _run(base, device, False)
    tol = max(4 * _rel(out_b, out_32), 2e-2)
    assert _rel(out_f, out_b) < tol, (_rel(out_f, out_b), tol)
    for n in grads_b:
        yard = max(4 * _rel(grads_b[n], grads_32[n]), 3e-2)
        assert _rel(grads_f[n], grads_b[n]) < yard, (n, _rel(grads_f[n], grads_b[n]), yard)
    # fp32 training: the hook sees no autocast and leaves the stream alone (bit for bit).
    out_a, grads_a = _run(fast, device, False)
    assert torch.equal(out_a, out_32) and all(torch.equal(grads_a[n], grads_32[n]) for n in grads_a)


def test_bf16_residual_reaches_diffmae_stacks():
    from ldae_fast.methods.diffmae.config import DiffMAEConfig
    from ldae_fast.methods.diffmae.model import build_diffmae

    m = build_diffmae(ModelConfig(size="tiny", patch_size=4, bf16_residual=True), DiffMAEConfig(decoder_kind="cross_self"),
                      IMG)
    hooked = [bool(stack[0]._forward_pre_hooks) for stack in speed.stacks(m)]
    assert hooked == [True, True]


@pytest.mark.parametrize("B,T,C", [(2, 9, 48), (3, 17, 64)])
def test_adaln_kernel_writes_the_activation_dtype(kernel_device, B, T, C):
    """The fused adaLN kernel with out_dtype=bfloat16 from float32 tokens and bf16 modulation:
    y is bfloat16 with no float32 copy, dx float32, dshift / dscale bf16, and each is as close to
    float64 as the reference computed in float32 then cast (2x plus the bf16 rounding floor)."""
    g = torch.Generator().manual_seed(B * 100 + T)
    x = torch.randn(B, T, C, generator=g).to(kernel_device)
    mod = (0.3 * torch.randn(B, 6 * C, generator=g)).to(kernel_device, torch.bfloat16)
    dy = torch.randn(B, T, C, generator=g).to(kernel_device, torch.bfloat16)

    xk, mk = x.clone().requires_grad_(True), mod.clone().requires_grad_(True)
    yk = adaln_norm.adaln_layernorm(xk, *mk.chunk(6, dim=-1)[:2], out_dtype=torch.bfloat16)
    assert yk.dtype == torch.bfloat16
    got = (yk, *torch.autograd.grad(yk, (xk, mk), dy))
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.bfloat16

    def math(dt, cast):
        xd, md = x.double().to(dt).requires_grad_(True), mod.to(dt).requires_grad_(True)
        sh, sc = md.chunk(6, dim=-1)[:2]
        y = F.layer_norm(xd, (C,), eps=1e-6) * (1 + sc.unsqueeze(1)) + sh.unsqueeze(1)
        y = y.to(cast) if cast else y
        return (y, *torch.autograd.grad(y, (xd, md), dy.to(y.dtype)))

    truth = math(torch.float64, None)
    xr, mr = x.clone().requires_grad_(True), mod.clone().requires_grad_(True)
    yr = reference.adaln_layernorm(xr, *mr.chunk(6, dim=-1)[:2]).to(torch.bfloat16)
    yard = (yr, *torch.autograd.grad(yr, (xr, mr), dy))
    for name, k, r, t in zip(("y", "dx", "dmod"), got, yard, truth):
        err = (k.double() - t).abs().max().item()
        err_ref = (r.double() - t).abs().max().item()
        floor = 2.0**-8 * t.abs().max().item()
        assert err <= 2 * err_ref + floor, (name, err, err_ref, floor)
        assert torch.isfinite(k).all()


def test_adaln_act_dtype_switch_in_the_model(kernel_device):
    """model.adaln_act_dtype: every fused norm writes bf16 under autocast (float32 without the
    switch) and the step's output and gradients match the fused path without it."""
    if kernel_device == "cpu":
        kernels = "triton"  # the interpreter (conftest sets TRITON_INTERPRET=1)
    else:
        kernels = "auto"
    base = perturbed(build_model(*cfg(fused_adaln=True), IMG, kernels=kernels)).to(kernel_device)
    fast = perturbed(build_model(*cfg(fused_adaln=True, adaln_act_dtype=True), IMG, kernels=kernels)).to(kernel_device)
    norms = [m for m in fast.modules() if isinstance(m, speed.AdaLNLayerNorm)]
    assert norms and all(m.act_dtype and m.on[kernel_device] for m in norms)
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(out.dtype)) for m in norms]
    out_f, grads_f = _run(fast, kernel_device, True)
    for h in hooks:
        h.remove()
    assert set(seen) == {torch.bfloat16}
    out_b, grads_b = _run(base, kernel_device, True)
    assert _rel(out_f, out_b) < 2e-2
    for n in grads_b:
        assert _rel(grads_f[n], grads_b[n]) < 5e-2, n


def test_adaln_act_dtype_needs_the_fused_kernel():
    with pytest.raises(ConfigError, match="model.fused_adaln"):
        cfg(adaln_act_dtype=True)
    with pytest.raises(ConfigError, match="model.fp8"):
        cfg(fp8="e4m3")


def test_fp8_without_torchao_is_one_clear_line(monkeypatch):
    """model.fp8 is an optional extra: without torchao building the model is a config error (exit
    2) in one line naming the field, torchao and the torch version its wheel must match."""
    monkeypatch.setattr(speed, "_torchao_float8", lambda: None)
    with pytest.raises(speed.SpeedSwitchError) as e:
        build_model(*cfg(fp8="rowwise"), IMG)
    msg = str(e.value)
    assert "model.fp8='rowwise'" in msg and "torchao" in msg and torch.__version__ in msg and "\n" not in msg
    assert e.value.exit_code == 2


def test_fp8_converts_only_the_blocks_linears(monkeypatch):
    """With torchao present (a stand-in here: none is installed on CPU machines) the conversion
    gets the recipe asked for and picks the blocks' qkv / proj / fc1 / fc2, never the embeddings,
    the adaLN modulation or the head."""
    calls = {}

    class FakeConfig:
        @staticmethod
        def from_recipe_name(name):
            calls["recipe"] = name
            return name

    def convert(model, config, module_filter_fn):
        calls["picked"] = [n for n, m in model.named_modules() if module_filter_fn(m, n)]
        return model

    monkeypatch.setattr(speed, "_torchao_float8", lambda: (FakeConfig, convert))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    model = build_model(ModelConfig(size="S", patch_size=16, encoder_depth=1, decoder_depth=1, fp8="tensorwise"),
                        LDAEConfig(layout="dit"), 32)
    assert calls["recipe"] == "tensorwise"
    assert sorted(calls["picked"]) == sorted(
        f"{half}.blocks.0.{name}" for half in ("encoder", "decoder")
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    assert model is not None
    # No FP8 GPU: refused in one line too.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(speed.SpeedSwitchError, match="sm_89"):
        build_model(*cfg(fp8="rowwise"), IMG)


def test_cuda_graph_step_is_refused_without_cuda():
    """The whole step under a CUDA graph needs a CUDA device: on CPU one line says so."""
    from ldae_fast.engine.cuda_graph import GraphedStep

    with pytest.raises(speed.SpeedSwitchError, match="CUDA graphs need a CUDA device"):
        GraphedStep(lambda x: x.sum(), (torch.zeros(2),))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays a captured step: needs CUDA")
def test_cuda_graph_step_replays_the_eager_step():
    """GPU leg: a captured forward + backward + AdamW step replayed on new inputs gives the
    weights the same steps give eagerly."""
    from ldae_fast.engine.cuda_graph import GraphedStep

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-2, capturable=True) for n in nets]
    xs = [torch.randn(32, 64, device="cuda") for _ in range(6)]

    def step(net, opt, x):
        opt.zero_grad(set_to_none=True)
        loss = net(x).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    graphed = GraphedStep(lambda x: step(nets[1], opts[1], x), (xs[0],), warmup=2)
    for _ in range(2):  # the capture's warm-up steps, eagerly
        step(nets[0], opts[0], xs[0])
    for x in xs[1:]:
        want = step(nets[0], opts[0], x)
        got = graphed(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
