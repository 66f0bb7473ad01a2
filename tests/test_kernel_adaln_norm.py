"""The fused adaLN-modulated LayerNorm against reference.adaln_layernorm: values and gradients for
x, shift and scale, mixed dtypes, strided views, partial requires_grad, its checks, and
torch.compile around both ops.

Runs in the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1) and compiled on CUDA
with LDAE_GPU_TESTS=1. Sizes are tiny on purpose: the interpreter executes numpy per program.
"""


import pytest
import torch
import torch.nn.functional as F

from ldae_fast import reference
from ldae_fast.kernels import adaln_layernorm
from ldae_fast.kernels.adaln_norm import AdaLNLayerNormFunction, adaln_layernorm_backward

EPS = 1e-6


@pytest.fixture
def device(kernel_device):
    """Every test here runs a kernel: conftest's kernel_device (skips where they cannot run)."""
    return kernel_device


def _inputs(B, T, C, device, xdtype=torch.float32, mdtype=None, seed=0, chunks=True):
    """x (B, T, C) with a per-token offset and spread (LayerNorm must remove both), and shift /
    scale as the block makes them: two of the six row-strided chunks of a (B, 6C) tensor.
    Returns (x, mod, shift, scale); mod is the tensor to take shift/scale gradients through."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g) * (0.5 + torch.rand(B, T, 1, generator=g)) + torch.randn(B, T, 1, generator=g)
    x = x.to(xdtype).to(device).requires_grad_(True)
    mod = (0.5 * torch.randn(B, 6 * C, generator=g)).to(mdtype or xdtype).to(device)
    if not chunks:
        mod = mod.view(B, 6, C).transpose(0, 1).contiguous()
    mod.requires_grad_(True)
    shift, scale = (mod.chunk(6, dim=-1) if chunks else mod.unbind(0))[3:5]
    return x, mod, shift, scale


def _dy(y, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=g).to(y.dtype).to(y.device)


def _close(got, want, rel):
    """Max error within `rel` of the largest magnitude (sums over C and T cancel, so elementwise
    relative error says nothing about small entries)."""
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel * want.double().abs().max().item() + 1e-12, (err, want.abs().max().item())


def _math(x, shift, scale):
    """The same math in whatever dtype the inputs have (float64 for the truth, bfloat16 for the
    PyTorch-in-bf16 yardstick)."""
    return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# (B, T, C): C not a power of two (48, 40, 24), C = 1, one token, T not a multiple of any tile.
SHAPES = [(2, 17, 48), (3, 1, 40), (2, 6, 64), (1, 33, 24), (2, 3, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,C", SHAPES, ids=[f"B{b}-T{t}-C{c}" for b, t, c in SHAPES])
def test_forward_and_grads_match_reference(device, B, T, C, dtype):
    x, mod, shift, scale = _inputs(B, T, C, device, dtype)
    y = adaln_layernorm(x, shift, scale)
    assert y.dtype == dtype and y.shape == (B, T, C) and y.is_contiguous()
    dy = _dy(y)
    dx, dmod = torch.autograd.grad(y, (x, mod), dy)
    assert dx.dtype == dtype and dmod.dtype == dtype

    if dtype == torch.float32:
        ref = reference.adaln_layernorm(x, shift, scale, EPS)
        rdx, rdmod = torch.autograd.grad(ref, (x, mod), dy)
        _close(y, ref, 1e-5)
        _close(dx, rdx, 1e-5)
        _close(dmod, rdmod, 1e-5)
        return
    # bf16: at most twice the error of the same math done by PyTorch in bf16, against float64.
    x64, mod64 = x.detach().double().requires_grad_(True), mod.detach().double().requires_grad_(True)
    true = _math(x64, *mod64.chunk(6, dim=-1)[3:5])
    tdx, tdmod = torch.autograd.grad(true, (x64, mod64), dy.double())
    xb, modb = x.detach().clone().requires_grad_(True), mod.detach().clone().requires_grad_(True)
    bf = _math(xb, *modb.chunk(6, dim=-1)[3:5])
    bdx, bdmod = torch.autograd.grad(bf, (xb, modb), dy)
    for name, got, yard, want in (("y", y, bf, true), ("dx", dx, bdx, tdx), ("dmod", dmod, bdmod, tdmod)):
        err = (got.detach().double() - want).abs().max().item()
        err_bf = (yard.detach().double() - want).abs().max().item()
        # Floor: a tenth of one bf16 ulp of the largest entry (C = 1 makes both errors ~0).
        floor = 2.0 ** -9 / 10 * want.abs().max().item() + 1e-12
        assert err <= 2 * err_bf + floor, (name, err, err_bf)


@pytest.mark.parametrize("xdtype,mdtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.float16, torch.bfloat16)], ids=["x_bf16", "mod_bf16", "x_fp16"])
def test_mixed_dtypes_and_determinism(device, xdtype, mdtype):
    """Under autocast the residual stream and the modulation need not share a dtype; each output
    comes back in its input's dtype, computed in float32."""
    B, T, C = 2, 9, 40
    x, mod, shift, scale = _inputs(B, T, C, device, xdtype, mdtype, seed=2, chunks=False)
    y = adaln_layernorm(x, shift, scale)
    dy = _dy(y, seed=3)
    grads = torch.autograd.grad(y, (x, shift, scale), dy)
    assert y.dtype == xdtype and [g.dtype for g in grads] == [xdtype, mdtype, mdtype]
    ref = reference.adaln_layernorm(x, shift, scale, EPS)
    rgrads = torch.autograd.grad(ref, (x, shift, scale), dy)
    # The reference does the same float32 math and rounds once: within one ulp of the largest entry.
    rel = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
    _close(y, ref, rel[xdtype])
    for got, want in zip(grads, rgrads):
        _close(got, want, rel[got.dtype])
    # The sums over tokens have a fixed order: the same inputs give the same bits.
    y2 = adaln_layernorm(x, shift, scale)
    grads2 = torch.autograd.grad(y2, (x, shift, scale), dy)
    assert torch.equal(y, y2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_partial_requires_grad(device):
    """Any subset of x, shift, scale may want a gradient; the others get none."""
    B, T, C = 2, 5, 24
    x0, mod0, _, _ = _inputs(B, T, C, device, seed=4, chunks=False)
    dy = _dy(x0, seed=5)
    for want in ([0], [1], [2], [1, 2], [0, 2]):
        ins = [x0.detach().clone(), mod0[3].detach().clone(), mod0[4].detach().clone()]
        for i in want:
            ins[i].requires_grad_(True)
        y = adaln_layernorm(*ins)
        grads = torch.autograd.grad(y, [ins[i] for i in want], dy, retain_graph=True)
        ref = reference.adaln_layernorm(*ins, EPS)
        rgrads = torch.autograd.grad(ref, [ins[i] for i in want], dy)
        for got, exp in zip(grads, rgrads):
            _close(got, exp, 1e-5)
        y.backward(dy)
        assert [t.grad is not None for t in ins] == [i in want for i in range(3)]
    plain = [x0.detach(), mod0[3].detach(), mod0[4].detach()]
    assert not adaln_layernorm(*plain).requires_grad
    with torch.no_grad():
        assert not adaln_layernorm(x0, mod0[3], mod0[4]).requires_grad


def test_strided_views(device):
    """Token-strided and batch-expanded views are read in place, a strided channel dim is copied;
    all give the reference's values and gradients, including for a non-contiguous dy."""
    B, T, C = 2, 7, 40
    g = torch.Generator().manual_seed(6)
    big = torch.randn(B, 2 * T, C, generator=g).to(device).requires_grad_(True)
    xt = torch.randn(B, C, T, generator=g).to(device).requires_grad_(True)
    row = (0.3 * torch.randn(1, 2 * C, generator=g)).to(device).requires_grad_(True)
    dy = torch.randn(B, C, T, generator=g).to(device).transpose(1, 2)
    for x, leaf in ((big[:, ::2], big), (xt.transpose(1, 2), xt)):
        shift, scale = row[:, :C].expand(B, C), row[:, C:].expand(B, C)
        y = adaln_layernorm(x, shift, scale)
        got = torch.autograd.grad(y, (leaf, row), dy)
        ref = reference.adaln_layernorm(x, shift, scale, EPS)
        want = torch.autograd.grad(ref, (leaf, row), dy)
        _close(y, ref, 1e-5)
        for a, b in zip(got, want):
            _close(a, b, 1e-5)


def test_empty_and_eps(device):
    x = torch.zeros(2, 0, 8, device=device, requires_grad=True)
    shift = torch.zeros(2, 8, device=device, requires_grad=True)
    scale = torch.zeros(2, 8, device=device, requires_grad=True)
    y = adaln_layernorm(x, shift, scale)
    assert y.shape == (2, 0, 8)
    dx, ds, dc = torch.autograd.grad(y.sum(), (x, shift, scale))
    assert dx.shape == x.shape and torch.equal(ds, torch.zeros_like(shift)) and torch.equal(dc, ds)
    # A constant row normalizes to 0 (not NaN) for eps > 0, and eps is honored.
    x = torch.full((1, 2, 8), 3.0, device=device)
    x[0, 1] = torch.arange(8.0)
    z = torch.zeros(1, 8, device=device)
    for eps in (1e-6, 0.5):
        y = adaln_layernorm(x, z, z, eps)
        torch.testing.assert_close(y, reference.adaln_layernorm(x, z, z, eps), rtol=1e-5, atol=1e-6)


def test_autograd_function_fallback(device):
    """The torch < 2.4 path (autograd.Function) gives the op's values and gradients."""
    x, mod, shift, scale = _inputs(2, 5, 24, device, seed=7)
    dy = _dy(x, seed=8)
    y1 = adaln_layernorm(x, shift, scale)
    g1 = torch.autograd.grad(y1, (x, mod), dy)
    y2 = AdaLNLayerNormFunction.apply(x, shift, scale, EPS)
    g2 = torch.autograd.grad(y2, (x, mod), dy)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_reference_path(device):
    x, mod, shift, scale = _inputs(2, 5, 24, device, seed=9)
    a = adaln_layernorm(x, shift, scale, kernels="reference")
    b = adaln_layernorm(x, shift, scale)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), (x, mod))
    gb = torch.autograd.grad(b.square().sum(), (x, mod))
    for u, v in zip(ga, gb):
        _close(u, v, 1e-5)


def test_bad_inputs_give_launcher_messages(device):
    x, _, shift, scale = _inputs(2, 3, 8, device)
    x, shift, scale = x.detach(), shift.detach(), scale.detach()
    ok = dict(x=x, shift=shift, scale=scale)
    cases = [
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(x=x[0]), ValueError, "x must have 3 dimensions"),
        (dict(x=x.double()), TypeError, "x must have dtype"),
        (dict(x=x[..., :0]), ValueError, "at least one channel"),
        (dict(shift=shift[:1]), ValueError, r"shift must have shape \(B, C\) = \(2, 8\)"),
        (dict(scale=scale[:, :4]), ValueError, "scale must have shape"),
        (dict(scale=scale[0]), ValueError, "scale must have 2 dimensions"),
        (dict(shift=shift.to(torch.int32)), TypeError, "shift must have dtype"),
        (dict(shift=torch.zeros(2, 8, device="meta")), ValueError, "shift is on meta"),
        (dict(eps="1e-6"), TypeError, "eps must be a float"),
        (dict(eps=-1.0), ValueError, "eps=-1.0 must be finite and >= 0"),
        (dict(eps=float("nan")), ValueError, "eps=nan"),
        (dict(kernels="fast"), ValueError, "kernels='fast'"),
    ]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            adaln_layernorm(**{**ok, **change})
    wide = torch.zeros(1, 1, (1 << 16) + 1, device=device)
    with pytest.raises(ValueError, match="exceed the kernel's limit"):
        adaln_layernorm(wide, wide[0], wide[0])
    stats = torch.zeros(6, device=device)
    with pytest.raises(ValueError, match="dy has shape"):
        adaln_layernorm_backward(x[:, :2], x, shift, scale, stats, stats)
    with pytest.raises(ValueError, match=r"mean must have shape \(B\*T,\)"):
        adaln_layernorm_backward(x, x, shift, scale, stats[:5], stats)
    with pytest.raises(TypeError, match="need_dx must be a bool"):
        adaln_layernorm_backward(x, x, shift, scale, stats, stats, need_dx=1)


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
def test_opcheck(device):
    x, _, shift, scale = _inputs(2, 5, 24, device, xdtype=torch.bfloat16, mdtype=torch.float32)
    torch.library.opcheck(torch.ops.ldae.adaln_layernorm_fwd.default, (x, shift, scale, EPS))
    _, mean, rstd = torch.ops.ldae.adaln_layernorm_fwd(x.detach(), shift.detach(), scale.detach(), EPS)
    dy = _dy(x)
    for need_dx, need_dmod in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.ldae.adaln_layernorm_bwd.default,
                              (dy, x.detach(), shift.detach(), scale.detach(), mean, rstd, need_dx, need_dmod))


def test_torch_compile_block(device):
    """A DiT block's norm + modulation under torch.compile(fullgraph=True): no graph break, the
    same output and gradients as eager."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python / platform")
    B, T, C = 2, 5, 24
    g = torch.Generator().manual_seed(10)
    x = torch.randn(B, T, C, generator=g).to(device).requires_grad_(True)
    c = torch.randn(B, C, generator=g).to(device)
    w = (0.1 * torch.randn(6 * C, C, generator=g)).to(device).requires_grad_(True)

    def block(x, c, w):
        sh, sc, gate, *_ = F.linear(F.silu(c), w).chunk(6, dim=-1)
        return x + gate.unsqueeze(1) * adaln_layernorm(x, sh, sc)

    eager = block(x, c, w)
    g_eager = torch.autograd.grad(eager.square().sum(), (x, w))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, c, w)
    g_comp = torch.autograd.grad(out.square().sum(), (x, w))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gpu_tiles(device, monkeypatch):
    """The GPU's tile choices: valid at the real sizes, and right when run (here in the
    interpreter, every fallback too)."""
    from ldae_fast.kernels import adaln_norm

    for B in (1, 64, 256, 1024):
        for C in (768, 1024, 5000):
            for t in adaln_norm.gpu_row_tiles(B, 257, C, sms=132):
                n_chunks = -(-257 // t.rows_per_prog)
                assert t.rows_per_prog % t.BLOCK_R == 0 and (n_chunks - 1) * t.rows_per_prog < 257
                assert B * n_chunks <= max(B, 4 * 132) and 4 <= t.num_warps <= 32
                assert t.BLOCK_C >= C and t.BLOCK_R * t.BLOCK_C <= max(2048, t.BLOCK_C)
    for B, T, C in ((2, 17, 48), (3, 5, 600)):
        x, mod, shift, scale = _inputs(B, T, C, device, seed=11)
        dy = _dy(x, seed=12)
        ref = reference.adaln_layernorm(x, shift, scale, EPS)
        want = torch.autograd.grad(ref, (x, mod), dy)
        for tiles in adaln_norm.gpu_row_tiles(B, T, C, sms=4):
            monkeypatch.setattr(adaln_norm, "_tiles", lambda *a, t=tiles, **k: [t])
            y = adaln_layernorm(x, shift, scale)
            got = torch.autograd.grad(y, (x, mod), dy)
            _close(y, ref, 1e-5)
            for a, b in zip(got, want):
                _close(a, b, 1e-5)
