"""The fused noise kernel against reference.latent_noise, its noise statistics and its checks.

Runs in the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1) and compiled on CUDA
with LDAE_GPU_TESTS=1. Sizes are tiny on purpose: the interpreter executes numpy per program.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from ldae_fast import reference
from ldae_fast.kernels import latent_noise, latent_noise_counter_span
from ldae_fast.kernels._common import check_runnable, tl, triton


@pytest.fixture
def device(kernel_device):
    """Every test here runs a kernel: conftest's kernel_device (skips where they cannot run)."""
    return kernel_device


# (patch, H, W, batch): every patch size the paper's pixel tokenizers use plus ViT's 14; odd
# batches, non-square images, and N not a multiple of the token block for p=2 (15 tokens).
GEOMS = [(2, 6, 10, 3), (4, 16, 32, 3), (8, 16, 32, 3), (14, 28, 28, 3), (16, 16, 32, 1)]


def _basis(D: int, d: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return q.t()[:d].float().contiguous().to(device)


def _inputs(p, H, W, B, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = 3 * p * p
    x = torch.randn(B, 3, H, W, generator=g).to(dtype).to(device)
    mean = (0.1 * torch.randn(D, generator=g)).to(device)
    gamma = (0.5 + torch.rand(B, generator=g)).to(device)
    sigma = (1.5 * torch.rand(B, generator=g)).to(device)
    return x, _basis(D, d, seed, device), mean, gamma, sigma


def _noise64(x, basis, mean, gamma, sigma, eps, p):
    """The noise op in float64 from the (exactly representable) inputs: the ground truth."""
    B, C, H, W = x.shape
    V = basis.double()
    z0 = (reference.patchify(x.double(), p) - mean.double()) @ V.t()
    zt = gamma.double().view(B, 1, 1) * z0 + sigma.double().view(B, 1, 1) * eps.double()
    return reference.unpatchify(zt @ V + mean.double(), p, H, W, C), z0


def _noise_in(dtype, x, basis, mean, gamma, sigma, eps, p):
    """The same math done by PyTorch entirely in `dtype`."""
    B, C, H, W = x.shape
    V = basis.to(dtype)
    z0 = (reference.patchify(x.to(dtype), p) - mean.to(dtype)) @ V.t()
    zt = gamma.to(dtype).view(B, 1, 1) * z0 + sigma.to(dtype).view(B, 1, 1) * eps.to(dtype)
    return reference.unpatchify(zt @ V + mean.to(dtype), p, H, W, C), z0


def _ds(D):
    return sorted({1, max(2, D // 3), D})


CASES = [(p, H, W, B, d) for p, H, W, B in GEOMS for d in _ds(3 * p * p)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p,H,W,B,d", CASES, ids=[f"p{c[0]}-{c[1]}x{c[2]}-B{c[3]}-d{c[4]}" for c in CASES])
def test_matches_reference(device, p, H, W, B, d, dtype):
    x, basis, mean, gamma, sigma = _inputs(p, H, W, B, d, dtype, device)
    out, z0, eps = latent_noise(x, basis, mean, gamma, sigma, p, seed=1234, offset=17,
                                return_z0=True, return_eps=True)
    N = (H // p) * (W // p)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert z0.shape == (B, N, d) and z0.dtype == torch.float32
    assert eps.shape == (B, N, d) and eps.dtype == torch.float32
    assert not out.requires_grad
    ref_out, ref_z0 = reference.latent_noise(x, basis, mean, gamma, sigma, eps, p)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(z0, ref_z0, rtol=1e-4, atol=1e-4)
        return
    # bf16: at most twice the error of the same math done by PyTorch in bf16, against float64.
    true_out, true_z0 = _noise64(x, basis, mean, gamma, sigma, eps, p)
    bf_out, bf_z0 = _noise_in(torch.bfloat16, x, basis, mean, gamma, sigma, eps, p)
    for got, bf, true in ((out, bf_out, true_out), (z0, bf_z0, true_z0)):
        err = (got.double() - true).abs().max().item()
        err_bf = (bf.double() - true).abs().max().item()
        assert err <= 2 * err_bf + 1e-6, (err, err_bf)


def test_noise_statistics(device):
    """(z_t - gamma z0) / sigma, read back from the noisy image, is white standard normal noise."""
    p, H, W, B, d = 4, 32, 32, 5, 48
    x, basis, mean, gamma, sigma = _inputs(p, H, W, B, d, torch.float32, device, seed=3)
    out, z0 = latent_noise(x, basis, mean, gamma, sigma, p, seed=2024, return_z0=True)
    zt = (reference.patchify(out.double(), p) - mean.double()) @ basis.double().t()
    e = ((zt - gamma.double().view(B, 1, 1) * z0.double()) / sigma.double().view(B, 1, 1)).cpu()
    n = e.numel()
    assert abs(e.mean().item()) < 5 / n**0.5
    assert abs(e.var().item() - 1) < 5 * (2 / n) ** 0.5
    # Gaussian shape, not just two moments: P(|e| < 1) = 0.6827, P(|e| < 2) = 0.9545.
    for k, pk in ((1.0, 0.6827), (2.0, 0.9545)):
        frac = (e.abs() < k).double().mean().item()
        assert abs(frac - pk) < 5 * (pk * (1 - pk) / n) ** 0.5
    # No correlation between samples, nor between neighbouring tokens or components.
    flat = e.reshape(B, -1)
    c = torch.corrcoef(flat)
    m = flat.shape[1]
    assert (c - torch.eye(B, dtype=c.dtype)).abs().max().item() < 5 / m**0.5
    for a, b in ((e[:, 1:, :], e[:, :-1, :]), (e[..., 1:], e[..., :-1])):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(r) < 5 / a.numel() ** 0.5


def test_same_seed_bit_identical_and_counter_semantics(device):
    p, H, W, B, d = 4, 8, 12, 3, 5
    x, basis, mean, gamma, sigma = _inputs(p, H, W, B, d, torch.bfloat16, device)
    a_out, a_eps = latent_noise(x, basis, mean, gamma, sigma, p, seed=7, offset=0, return_eps=True)
    b_out, b_eps = latent_noise(x, basis, mean, gamma, sigma, p, seed=7, offset=0, return_eps=True)
    assert torch.equal(a_out, b_out) and torch.equal(a_eps, b_eps)
    # eps depends only on (seed, counter), not on the image or the coefficients.
    x2, _, _, g2, s2 = _inputs(p, H, W, B, d, torch.bfloat16, device, seed=9)
    _, eps2 = latent_noise(x2, basis, mean, g2, s2, p, seed=7, offset=0, return_eps=True)
    assert torch.equal(eps2, a_eps)
    # Another offset or seed: other noise. The counter is offset + flat index of (b, n, k).
    c_out, c_eps = latent_noise(x, basis, mean, gamma, sigma, p, seed=7, offset=5, return_eps=True)
    assert not torch.equal(c_out, a_out)
    assert torch.equal(c_eps.flatten()[:-5], a_eps.flatten()[5:])
    _, s_eps = latent_noise(x, basis, mean, gamma, sigma, p, seed=8, offset=0, return_eps=True)
    assert not torch.equal(s_eps, a_eps)
    # Next draw in the same stream: advance by the span, no overlap with the first.
    span = latent_noise_counter_span(x.shape, d, p)
    assert span == a_eps.numel()
    _, n_eps = latent_noise(x, basis, mean, gamma, sigma, p, seed=7, offset=span, return_eps=True)
    assert not torch.isin(n_eps.flatten(), a_eps.flatten()).any()
    # The counter is 64-bit: it carries across 2**32 instead of wrapping onto offset 0.
    lo = 2**32 - 7
    _, e1 = latent_noise(x, basis, mean, gamma, sigma, p, seed=7, offset=lo, return_eps=True)
    _, e2 = latent_noise(x, basis, mean, gamma, sigma, p, seed=7, offset=2**32, return_eps=True)
    assert torch.equal(e1.flatten()[7:], e2.flatten()[:-7])
    assert not torch.equal(e2, a_eps)
    # Large (63-bit) seeds are accepted and give their own stream.
    _, big = latent_noise(x, basis, mean, gamma, sigma, p, seed=2**63 - 1, return_eps=True)
    assert not torch.equal(big, a_eps)


# At module level: the interpreter of triton < 3.2 and the compiler of triton 3.0-3.3 look `tl`
# up in the kernel's module globals only, so a kernel defined in a test with a local import fails.
@triton.jit
def _randn_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.randn(seed, offset + i), mask=i < n)


def test_eps_is_tl_randn_at_offset_plus_index(device):
    """Below 2**32 the counter scheme is exactly tl.randn(seed, offset + flat index)."""
    p, H, W, B, d = 4, 8, 12, 3, 5
    x, basis, mean, gamma, sigma = _inputs(p, H, W, B, d, torch.float32, device)
    _, eps = latent_noise(x, basis, mean, gamma, sigma, p, seed=99, offset=1000, return_eps=True)
    want = torch.empty(eps.numel(), device=device)
    _randn_kernel[(triton.cdiv(want.numel(), 64),)](want, 99, 1000, want.numel(), BLOCK=64)
    assert torch.equal(eps.flatten(), want)


def test_return_variants_and_identity_paths(device):
    p, H, W, B, d = 4, 8, 8, 2, 48
    x, basis, mean, gamma, sigma = _inputs(p, H, W, B, d, torch.float32, device)
    out = latent_noise(x, basis, mean, gamma, sigma, p, seed=1)
    assert isinstance(out, torch.Tensor)
    (o1, z0) = latent_noise(x, basis, mean, gamma, sigma, p, seed=1, return_z0=True)
    (o2, eps) = latent_noise(x, basis, mean, gamma, sigma, p, seed=1, return_eps=True)
    assert torch.equal(out, o1) and torch.equal(out, o2)
    assert z0.shape == eps.shape == (B, 4, d)
    # Full basis, gamma 1, sigma 0: the round trip through the latent returns the image.
    one, zero = torch.ones_like(gamma), torch.zeros_like(sigma)
    same = latent_noise(x, basis, mean, one, zero, p, seed=1)
    torch.testing.assert_close(same, x, rtol=1e-4, atol=1e-4)


def test_no_gradient_flows_to_inputs(device):
    p, H, W, B, d = 4, 8, 8, 2, 6
    x, basis, mean, gamma, sigma = _inputs(p, H, W, B, d, torch.float32, device)
    x.requires_grad_(True)
    gamma.requires_grad_(True)
    out, z0 = latent_noise(x, basis, mean, gamma, sigma, p, seed=1, return_z0=True)
    assert not out.requires_grad and not z0.requires_grad and out.grad_fn is None


def test_reference_path(device):
    p, H, W, B, d = 4, 8, 12, 3, 7
    x, basis, mean, gamma, sigma = _inputs(p, H, W, B, d, torch.float32, device)
    out, z0, eps = latent_noise(x, basis, mean, gamma, sigma, p, seed=5, return_z0=True,
                                return_eps=True, kernels="reference")
    ref_out, ref_z0 = reference.latent_noise(x, basis, mean, gamma, sigma, eps, p)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(z0, ref_z0)
    again = latent_noise(x, basis, mean, gamma, sigma, p, seed=5, kernels="reference")
    assert torch.equal(again, out)
    tri = latent_noise(x, basis, mean, gamma, sigma, p, seed=5, return_eps=True)[1]
    assert tri.shape == eps.shape
    # A sample's reference noise depends on (seed, its counters) alone, like the kernel's: rows
    # 1..2 drawn on their own (offset = 1 N d) are rows 1..2 of the whole call.
    N = (H // p) * (W // p)
    _, part = latent_noise(x[1:].contiguous(), basis, mean, gamma[1:].contiguous(), sigma[1:].contiguous(), p,
                           seed=5, offset=N * d, return_eps=True, kernels="reference")
    assert torch.equal(part, eps[1:])
    _, other = latent_noise(x, basis, mean, gamma, sigma, p, seed=6, return_eps=True, kernels="reference")
    assert not torch.equal(other, eps)


def _bad_cases(device):
    p, H, W, B, d = 4, 8, 8, 2, 5
    x, basis, mean, gamma, sigma = _inputs(p, H, W, B, d, torch.float32, device)
    ok = dict(x=x, basis=basis, mean=mean, gamma=gamma, sigma=sigma, p=p, seed=1, offset=0)
    return ok, [
        (dict(x=x.cpu().numpy()), TypeError, "x must be a torch.Tensor"),
        (dict(x=x[0]), ValueError, "x must have 4 dimensions"),
        (dict(x=x.to(torch.int32)), TypeError, "x must have dtype"),
        (dict(x=x.transpose(2, 3)), ValueError, "x must be contiguous"),
        (dict(x=x[:, :, :6].contiguous()), ValueError, "not divisible by the patch size"),
        (dict(p=0), ValueError, "p=0 must be >= 1"),
        (dict(p=4.0), TypeError, "p must be an int"),
        (dict(basis=basis.double()), TypeError, "basis must have dtype float32"),
        (dict(basis=torch.zeros(5, 47, device=device)), ValueError, "basis must be V_d of shape"),
        (dict(basis=torch.zeros(49, 48, device=device)), ValueError, "basis must be V_d of shape"),
        (dict(mean=mean[:-1]), ValueError, "mean must have shape"),
        (dict(gamma=gamma[:1]), ValueError, "gamma must have shape"),
        (dict(sigma=sigma.view(2, 1)), ValueError, "sigma must have 1 dimensions"),
        (dict(sigma=torch.zeros(2, device="meta")), ValueError, "sigma is on meta"),
        (dict(seed=-1), ValueError, "seed=-1 must be in"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(offset=-3), ValueError, "offset=-3 must be in"),
        (dict(offset=2**63), ValueError, "offset="),
        (dict(return_z0=1), TypeError, "return_z0 must be a bool"),
        (dict(kernels="cuda"), ValueError, "kernels='cuda'"),
    ]


def test_bad_inputs_give_launcher_messages(device):
    ok, cases = _bad_cases(device)
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg.replace("(", r"\(").replace("[", r"\[")):
            latent_noise(**{**ok, **change})


def test_cpu_without_interpreter_message():
    class _Compiled:  # stands for a JITFunction: anything but the interpreter's class
        pass

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*kernels='reference'"):
        check_runnable(_Compiled(), torch.device("cpu"), "latent_noise")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_cpu_without_interpreter_end_to_end():
    """A fresh process without TRITON_INTERPRET gets the launcher's message, not a Triton crash."""
    code = (
        "import torch\n"
        "from ldae_fast.kernels import latent_noise, pca_loss, triton_available\n"
        "assert not triton_available()\n"
        "x = torch.zeros(1, 3, 4, 4); b = torch.eye(48)[:4].contiguous(); o = torch.ones(1)\n"
        "for f in (lambda: latent_noise(x, b, torch.zeros(48), o, o, 4, seed=0),\n"
        "          lambda: pca_loss(x, x, b, o, 4)):\n"
        "    try:\n"
        "        f()\n"
        "    except RuntimeError as e:\n"
        "        assert 'TRITON_INTERPRET=1' in str(e) and \"kernels='reference'\" in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


_AOT = r"""
import importlib, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
# ASTSource(fn, {name: type | "constexpr"}, {name: value}) works on triton 3.0 through 3.9 (the
# third parameter was renamed constants -> constexprs in 3.3; passed by position here).
noise = importlib.import_module("ldae_fast.kernels.noise")
loss = importlib.import_module("ldae_fast.kernels.pca_loss")
i32 = dict.fromkeys(["N", "d", "D", "HW", "W", "wp", "CHW"], "i32")
tiles = dict(P=16, BLOCK_T=128, BLOCK_D=64, BLOCK_K=16, DOT_PREC="tf32x3")
jobs = [
    (noise._latent_noise_kernel, dict(x_ptr="*bf16", out_ptr="*bf16", v_ptr="*fp32", g_ptr="*fp32", mu_ptr="*fp32",
     gamma_ptr="*fp32", sigma_ptr="*fp32", z0_ptr="*fp32", eps_ptr="*fp32", seed="i64", offset="i32", **i32),
     dict(tiles, STORE_Z0=True, STORE_EPS=True)),
    (loss._pca_loss_fwd_kernel, dict(pred_ptr="*bf16", tgt_ptr="*fp32", v_ptr="*fp32", lam_ptr="*fp32",
     proj_ptr="*fp32", partial_ptr="*fp32", **i32, low="fp32", high="fp32", inv_count="fp32"),
     dict(tiles, USE_PROJ=True, STORE_PROJ=True)),
    (loss._pca_loss_bwd_kernel, dict(grad_ptr="*bf16", pred_ptr="*bf16", tgt_ptr="*fp32", v_ptr="*fp32",
     lam_ptr="*fp32", proj_ptr="*fp32", gout_ptr="*fp32", **i32, low="fp32", high="fp32",
     two_inv_count="fp32"), dict(tiles, USE_PROJ=True)),
]
opts = [{"num_warps": 4, "num_stages": 2}] * len(jobs)
# adaLN LayerNorm at the launcher's GPU tiles: C = 1024 (2 rows, 8 warps) and 8192 (32 warps).
adaln = importlib.import_module("ldae_fast.kernels.adaln_norm")
rows = dict.fromkeys(["T", "C", "n_chunks"], "i32")
for block_c, block_r, warps in ((1024, 2, 8), (8192, 1, 32)):
    jobs += [
        (adaln._adaln_ln_fwd_kernel, dict(x_ptr="*bf16", shift_ptr="*bf16", scale_ptr="*fp32",
         y_ptr="*bf16", mean_ptr="*fp32", rstd_ptr="*fp32", **rows, stride_xb="i32", stride_xt="i32",
         stride_shift="i32", stride_scale="i32", eps="fp32"), dict(BLOCK_R=block_r, BLOCK_C=block_c)),
        (adaln._adaln_ln_bwd_kernel, dict(dy_ptr="*bf16", x_ptr="*bf16", scale_ptr="*fp32",
         mean_ptr="*fp32", rstd_ptr="*fp32", dx_ptr="*bf16", dshift_ptr="*fp32", dscale_ptr="*fp32",
         **rows, rows_per_prog="i32", stride_dyb="i32", stride_dyt="i32", stride_xb="i32",
         stride_xt="i32", stride_scale="i32"),
         dict(BLOCK_R=block_r, BLOCK_C=block_c, STORE_DX=True, STORE_DMOD=True)),
    ]
    opts += [{"num_warps": warps, "num_stages": 1}] * 2
for (fn, sig, consts), opt in zip(jobs, opts):
    try:
        src = ASTSource(fn, {**sig, **dict.fromkeys(consts, "constexpr")}, consts)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opt)
    except Exception as e:
        if "ptxas" in str(e) and "not found" in str(e).lower():
            print("SKIP: no ptxas"); sys.exit(0)
        raise
    tag = f"[C{consts['BLOCK_C']}]" if "BLOCK_C" in consts else ""
    print(fn.__name__ + tag, k.metadata.shared)
print("OK")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="triton's bundled ptxas is Linux-only")
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects (types, layouts, constexpr use): build
    the kernels for an H100 target without a GPU, through ptxas, and check shared memory fits."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _AOT], env=env, cwd=root, capture_output=True,
                       text=True, timeout=300)
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]
    for line in r.stdout.splitlines()[:-1]:
        assert int(line.split()[1]) <= 227 * 1024, line


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
def test_opcheck(device):
    p, H, W, B, d = 4, 8, 8, 2, 5
    x, basis, mean, gamma, sigma = _inputs(p, H, W, B, d, torch.float32, device)
    # test_autograd_registration is meaningless for an op with no gradient.
    torch.library.opcheck(torch.ops.ldae.latent_noise.default,
                          (x, basis, mean, gamma, sigma, p, 3, 0, True, True, None),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    # A separate decoder G (D, d): the general linear tokenizer's call.
    G = torch.randn(basis.shape[1], d, device=device)
    torch.library.opcheck(torch.ops.ldae.latent_noise.default,
                          (x, basis, mean, gamma, sigma, p, 3, 0, True, False, G),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_gpu_tiles_first_choices(monkeypatch):
    """The first GPU tiles are the ones ptxas builds without spills for sm_90 (see gpu_tiles);
    fallbacks shrink from there; d > 256 never asks for a tf32x3 dot."""
    from ldae_fast.kernels import _common

    monkeypatch.setattr(_common, "num_sms", lambda device: 132)
    monkeypatch.delenv("LDAE_KERNEL_TILES", raising=False)
    cuda = torch.device("cuda")
    for d, warps in ((16, 4), (128, 8)):
        tiles = _common.gpu_tiles(256, 768, d, 256, cuda, "tf32x3")
        assert tiles[0][:4] == (64, 32, max(16, d), warps) and tiles[0].prec == "tf32x3"
        assert [t.BLOCK_T for t in tiles] == sorted((t.BLOCK_T for t in tiles), reverse=True)
        assert tiles[-1].prec == "ieee" and len(set(tiles)) == len(tiles)
    # 32 samples x 4 tiles of 64 tokens leave SMs idle: 32 tokens per tile, and no smaller.
    assert _common.gpu_tiles(256, 768, 128, 32, cuda, "tf32x3")[0].BLOCK_T == 32
    assert _common.gpu_tiles(256, 768, 128, 33, cuda, "tf32x3")[0].BLOCK_T == 64
    assert _common.gpu_tiles(256, 768, 128, 1, cuda, "tf32x3")[0].BLOCK_T == 32
    assert {t.prec for t in _common.gpu_tiles(256, 768, 768, 256, cuda, "tf32x3")} == {"ieee"}
    monkeypatch.setenv("LDAE_KERNEL_TILES", "128,64,4,2")
    assert _common.gpu_tiles(256, 768, 16, 256, cuda, "tf32")[0] == (128, 64, 16, 4, 2, "tf32")


def test_launch_fallback_says_once_which_tile_ran():
    from ldae_fast.kernels import _common

    class OutOfResources(Exception):  # triton's exception is matched by name
        pass

    big, small = (_common.Tiles(64, 32, 16, 4, 2, "tf32"), _common.Tiles(32, 32, 16, 4, 2, "tf32"))
    tried = []

    def run(t):
        tried.append(t)
        if t == big:
            raise OutOfResources("shared memory, Required: 300000")
        return t.BLOCK_T

    key = ("test_op", "fallback-test")
    with pytest.warns(RuntimeWarning, match=r"test_op: launch configuration .* using .*BLOCK_T=32"):
        assert _common.launch_with_fallback(key, [big, small], run) == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known now: no second warning, no second try of `big`
        assert _common.launch_with_fallback(key, [big, small], run) == 32
    assert tried == [big, small, small]

    def broken(t):
        raise ValueError("a real error")

    with pytest.raises(ValueError, match="a real error"):
        _common.launch_with_fallback(("test_op", "other"), [big, small], broken)
