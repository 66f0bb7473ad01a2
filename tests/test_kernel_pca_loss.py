"""The fused PCA-space loss against reference.pca_loss_fast / pca_loss_full, its gradient against
autograd through the reference, its checks, and torch.compile around both kernels.

Runs in the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1) and compiled on CUDA
with LDAE_GPU_TESTS=1.
"""


import pytest
import torch

from ldae_fast import reference
from ldae_fast.kernels import latent_noise, pca_loss


@pytest.fixture
def device(kernel_device):
    """Every test here runs a kernel: conftest's kernel_device (skips where they cannot run)."""
    return kernel_device


GEOMS = [(2, 6, 10, 3), (4, 16, 32, 3), (8, 16, 32, 3), (14, 28, 28, 3), (16, 16, 32, 1)]


def _full_basis(D: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return q.t().float().contiguous().to(device)


def _inputs(p, H, W, B, dtype, device, seed=0, tdtype=None):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, 3, H, W, generator=g)
    pred = (target + 0.5 * torch.randn(B, 3, H, W, generator=g)).to(dtype).to(device)
    lam = (0.2 + torch.rand(B, generator=g)).to(device)
    return pred, target.to(tdtype or dtype).to(device), lam


def _loss64(pred, target, basis, lam, p, low, high):
    """The loss in float64 from the (exactly representable) inputs: the ground truth."""
    e = reference.patchify(target.double(), p) - reference.patchify(pred.double(), p)
    proj = e @ basis.double().t()
    per_tok = high * e.square().sum(-1) + (low - high) * proj.square().sum(-1)
    return (lam.double().view(-1, 1) * per_tok).mean()


def _loss_in(dtype, pred, target, basis, lam, p, low, high):
    """The same math done by PyTorch entirely in `dtype`."""
    e = reference.patchify(target.to(dtype), p) - reference.patchify(pred, p)
    proj = e @ basis.to(dtype).t()
    per_tok = high * e.square().sum(-1) + (low - high) * proj.square().sum(-1)
    return (lam.to(dtype).view(-1, 1) * per_tok).mean()


def _close(got, want, rel=1e-5):
    """Max error within `rel` of the largest magnitude: fp32 sums over D cancel, so elementwise
    relative error says nothing about small entries."""
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel * want.double().abs().max().item() + 1e-12, (err, want.abs().max().item())


def _ds(D):
    return sorted({1, max(2, D // 3), D})


CASES = [(p, H, W, B, d) for p, H, W, B in GEOMS for d in _ds(3 * p * p)]
IDS = [f"p{c[0]}-{c[1]}x{c[2]}-B{c[3]}-d{c[4]}" for c in CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p,H,W,B,d", CASES, ids=IDS)
def test_loss_and_grad_match_reference(device, p, H, W, B, d, dtype):
    D = 3 * p * p
    full = _full_basis(D, device=device)
    basis = full[:d].contiguous()
    pred, target, lam = _inputs(p, H, W, B, dtype, device)
    pred.requires_grad_(True)
    loss = pca_loss(pred, target, basis, lam, p)
    (grad,) = torch.autograd.grad(loss, pred)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype and grad.shape == pred.shape

    ref = reference.pca_loss_fast(pred, target, basis, lam, p)
    (ref_grad,) = torch.autograd.grad(ref, pred)
    full_loss = reference.pca_loss_full(pred.detach(), target, full, lam, d, p)
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, full_loss, rtol=1e-4, atol=1e-6)
        _close(grad, ref_grad, 1e-5)
        return
    # bf16: at most twice the error of the same math done by PyTorch in bf16, against float64.
    p64 = pred.detach().double().requires_grad_(True)
    true = _loss64(p64, target, basis, lam, p, 1.0, 0.1)
    (true_grad,) = torch.autograd.grad(true, p64)
    pb = pred.detach().clone().requires_grad_(True)
    bf = _loss_in(torch.bfloat16, pb, target, basis, lam, p, 1.0, 0.1)
    (bf_grad,) = torch.autograd.grad(bf, pb)
    err, err_bf = abs(loss.item() - true.item()), abs(bf.double().item() - true.item())
    assert err <= 2 * err_bf + 1e-6 * abs(true.item()), (err, err_bf)
    gerr = (grad.double() - true_grad).abs().max().item()
    gerr_bf = (bf_grad.double() - true_grad).abs().max().item()
    assert gerr <= 2 * gerr_bf + 1e-9, (gerr, gerr_bf)
    # And bf16 inputs are accumulated in float32: far closer than the bf16 math.
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("low,high", [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (1.0, 0.0)])
def test_general_weights(device, low, high):
    """low = high = 1 is MSE * D; low < high and zero weights too (the trajectory's other losses)."""
    p, H, W, B, d = 4, 8, 12, 3, 10
    D = 3 * p * p
    full = _full_basis(D, seed=1, device=device)
    pred, target, lam = _inputs(p, H, W, B, torch.float32, device, seed=1)
    pred.requires_grad_(True)
    loss = pca_loss(pred, target, full[:d].contiguous(), lam, p, low, high)
    ref = reference.pca_loss_full(pred, target, full, lam, d, p, low, high)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)
    g, = torch.autograd.grad(loss, pred)
    rg, = torch.autograd.grad(ref, pred)
    _close(g, rg, 1e-5)
    if low == high == 1.0:
        mse = (lam.view(-1, 1, 1, 1) * (pred - target).square()).mean() * D
        torch.testing.assert_close(loss, mse, rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_grad_scale_and_determinism(device):
    """bf16 prediction against a float32 target (autocast output vs. clean image)."""
    p, H, W, B, d = 4, 8, 12, 3, 7
    basis = _full_basis(48, device=device)[:d].contiguous()
    pred, target, lam = _inputs(p, H, W, B, torch.bfloat16, device, tdtype=torch.float32)
    pred.requires_grad_(True)
    loss = pca_loss(pred, target, basis, lam, p)
    (3.5 * loss).backward()
    g1 = pred.grad.clone()
    assert g1.dtype == torch.bfloat16
    ref = reference.pca_loss_fast(pred, target, basis, lam, p)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    (rg,) = torch.autograd.grad(3.5 * ref, pred)
    _close(g1, rg, 1e-2)
    # The same inputs give the same loss and gradient bit for bit.
    pred.grad = None
    loss2 = pca_loss(pred, target, basis, lam, p)
    (3.5 * loss2).backward()
    assert torch.equal(loss, loss2) and torch.equal(pred.grad, g1)


def test_no_grad_paths(device):
    p, H, W, B, d = 4, 8, 8, 2, 5
    basis = _full_basis(48, device=device)[:d].contiguous()
    pred, target, lam = _inputs(p, H, W, B, torch.float32, device)
    loss = pca_loss(pred, target, basis, lam, p)
    assert not loss.requires_grad
    pred.requires_grad_(True)
    target.requires_grad_(True)
    lam.requires_grad_(True)
    with torch.no_grad():
        assert not pca_loss(pred, target, basis, lam, p).requires_grad
    loss = pca_loss(pred, target, basis, lam, p)
    loss.backward()
    assert pred.grad is not None and target.grad is None and lam.grad is None


def test_reference_path(device):
    p, H, W, B, d = 4, 8, 8, 2, 5
    basis = _full_basis(48, device=device)[:d].contiguous()
    pred, target, lam = _inputs(p, H, W, B, torch.float32, device)
    a = pca_loss(pred, target, basis, lam, p, kernels="reference")
    b = pca_loss(pred, target, basis, lam, p)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_inputs_give_launcher_messages(device):
    p, H, W, B, d = 4, 8, 8, 2, 5
    basis = _full_basis(48, device=device)[:d].contiguous()
    pred, target, lam = _inputs(p, H, W, B, torch.float32, device)
    ok = dict(pred=pred, target=target, basis=basis, lam=lam, p=p)
    cases = [
        (dict(pred=[1.0]), TypeError, "pred must be a torch.Tensor"),
        (dict(pred=pred.double()), TypeError, "pred must have dtype"),
        (dict(target=target[:1]), ValueError, "target has shape"),
        (dict(target=target.transpose(2, 3).contiguous().transpose(2, 3)), ValueError, "target must be contiguous"),
        (dict(pred=pred[..., :6].contiguous(), target=target[..., :6].contiguous()), ValueError, "not divisible"),
        (dict(basis=basis.t().contiguous()), ValueError, "basis must be V_d of shape"),
        (dict(basis=basis.half()), TypeError, "basis must have dtype float32"),
        (dict(lam=lam[:1]), ValueError, "lam must have shape"),
        (dict(lam=lam.double()), TypeError, "lam must have dtype float32"),
        (dict(lam=torch.ones(2, device="meta")), ValueError, "lam is on meta"),
        (dict(p=3), ValueError, "not divisible by the patch size p=3"),
        (dict(low="1"), TypeError, "low must be a float"),
        (dict(high=float("nan")), ValueError, "high=nan must be finite"),
        (dict(kernels="fast"), ValueError, "kernels='fast'"),
    ]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg.replace("(", r"\(")):
            pca_loss(**{**ok, **change})


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
def test_opcheck(device):
    p, H, W, B, d = 4, 8, 8, 2, 5
    basis = _full_basis(48, device=device)[:d].contiguous()
    pred, target, lam = _inputs(p, H, W, B, torch.float32, device)
    pred.requires_grad_(True)
    torch.library.opcheck(torch.ops.ldae.pca_loss_fwd.default, (pred, target, basis, lam, p, 1.0, 0.1, True))
    proj = torch.zeros(B, 4, d, device=device)
    torch.library.opcheck(torch.ops.ldae.pca_loss_bwd.default,
                          (torch.ones((), device=device), pred.detach(), target, basis, lam, proj, p, 1.0, 0.1))


def test_torch_compile_both_ops(device):
    """A training step's kernel calls under torch.compile(fullgraph=True): no graph break, the
    same loss and gradient as eager."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python / platform")
    p, H, W, B, d = 4, 8, 12, 3, 6
    full = _full_basis(48, device=device)
    basis, mean = full[:d].contiguous(), torch.zeros(48, device=device)
    x, _, lam = _inputs(p, H, W, B, torch.float32, device)
    gamma, sigma = torch.ones(B, device=device), torch.full((B,), 0.7, device=device)

    def step(x, w, seed: int):
        x_in = latent_noise(x, basis, mean, gamma, sigma, p, seed=seed)
        return pca_loss(x_in * w, x, basis, lam, p)

    w = torch.full((1, 3, 1, 1), 0.9, device=device, requires_grad=True)
    eager = step(x, w, 11)
    (g_eager,) = torch.autograd.grad(eager, w)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x, w, 11)
    (g_comp,) = torch.autograd.grad(out, w)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-4, atol=1e-6)
