"""Fused weighted PCA-space loss of l-DAE, forward and backward, reading images in NCHW layout.

Per token, with e = patchify(target) - patchify(pred) and V_d the first d PCA rows,
    l = high |e|^2 + (low - high) |V_d e|^2,
which equals sum_i w_i r_i^2 for r = V e in the full orthonormal basis (w_i = low for i < d, high
otherwise): the (D, D) product is never formed. loss = mean over B*N tokens of lam_b * l.

Forward: a program owns BLOCK_T tokens of one image, walks D in chunks loading (BLOCK_T, BLOCK_D)
tiles of pred and target by index arithmetic from NCHW, keeps |e|^2 per token and V_d e (BLOCK_T,
BLOCK_K) in registers, and writes one partial sum (already scaled by lam_b / (B N)). The partials
are summed by torch: a fixed reduction tree, so the loss is the same bit for bit run after run
(no atomics). When a gradient will be needed it also writes proj = V_d e, (B, N, d) float32.
Backward: one more pass over pred and target, dpred = -(2 g lam_b / (B N)) (high e + (low-high)
proj V_d), written in pred's layout and dtype. No (B, N, D) tensor is ever stored.

Layers: the two @triton.jit kernels -> `pca_loss_forward` / `pca_loss_backward` (launchers with
checks) -> `pca_loss` (public: torch.library ops `ldae::pca_loss_fwd` / `ldae::pca_loss_bwd` with
register_autograd on torch >= 2.4, `PCALossFunction` otherwise; or reference.pca_loss_fast with
kernels='reference').
"""

from typing import Tuple

import torch

from .. import reference
from ._common import (
    IMAGE_DTYPES,
    check_int,
    check_patch,
    check_runnable,
    check_tensor,
    device_guard,
    dot_precision,
    gpu_tiles,
    has_custom_op,
    interpreter_tiles,
    is_interpreted,
    launch_with_fallback,
    patch_major_to_channel_major,
    tl,
    triton,
)

_OP = "pca_loss"


@triton.jit
def _token_tile(pid_t, N, d, wp, W, P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's BLOCK_T tokens (index, mask, offset of the patch's top-left pixel in one
    NCHW image) and the BLOCK_K lanes of the d principal components (index, mask)."""
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < N
    tok_off = (t // wp) * (P * W) + (t % wp) * P
    k = tl.arange(0, BLOCK_K)
    k_mask = k < d
    return t, t_mask, tok_off, k, k_mask


@triton.jit
def _residual_tile(pred_ptr, tgt_ptr, tok_off, t_mask, j0, D, HW, W,
                   P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Components j0 .. j0 + BLOCK_D of the tokens' patches: their index and mask, their NCHW
    offsets and mask, and e = target - pred there in float32."""
    j = j0 + tl.arange(0, BLOCK_D)
    j_mask = j < D
    # (C, P, P) patch order: runs of P pixels contiguous in NCHW (basis permuted to match).
    off = tok_off[:, None] + ((j // (P * P)) * HW + ((j // P) % P) * W + (j % P))[None, :]
    m = t_mask[:, None] & j_mask[None, :]
    # Masked lanes load 0 from both, so e = 0 there and padding adds nothing.
    e = (tl.load(tgt_ptr + off, mask=m, other=0.0).to(tl.float32)
         - tl.load(pred_ptr + off, mask=m, other=0.0).to(tl.float32))
    return j, j_mask, off, m, e


@triton.jit
def _pca_loss_fwd_kernel(
    pred_ptr, tgt_ptr, v_ptr, lam_ptr, proj_ptr, partial_ptr,
    N, d, D, HW, W, wp, CHW, low, high, inv_count,
    P: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PROJ: tl.constexpr, STORE_PROJ: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    # The int64 batch offset goes into the base pointers so per-element offsets stay int32.
    img = b.to(tl.int64) * CHW
    pred_ptr += img
    tgt_ptr += img
    t, t_mask, tok_off, k, k_mask = _token_tile(pid_t, N, d, wp, W, P, BLOCK_T, BLOCK_K)

    e2 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    proj = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j0 in range(0, D, BLOCK_D):
        j, j_mask, off, m, e = _residual_tile(pred_ptr, tgt_ptr, tok_off, t_mask, j0, D, HW, W, P, BLOCK_D)
        e2 += tl.sum(e * e, axis=1)
        if USE_PROJ:
            v = tl.load(v_ptr + k[:, None] * D + j[None, :], mask=k_mask[:, None] & j_mask[None, :], other=0.0)
            proj = tl.dot(e, tl.trans(v), proj, input_precision=DOT_PREC)

    per_tok = high * e2
    if USE_PROJ:
        per_tok += (low - high) * tl.sum(proj * proj, axis=1)
        if STORE_PROJ:
            row = b.to(tl.int64) * N + t
            tl.store(proj_ptr + row[:, None] * d + k[None, :], proj, mask=t_mask[:, None] & k_mask[None, :])
    lam = tl.load(lam_ptr + b)
    # Pre-scaled by lam_b / (B N): one torch .sum() of the partials is then the loss itself.
    tl.store(partial_ptr + b * tl.num_programs(0) + pid_t, tl.sum(per_tok, axis=0) * (lam * inv_count))


@triton.jit
def _pca_loss_bwd_kernel(
    grad_ptr, pred_ptr, tgt_ptr, v_ptr, lam_ptr, proj_ptr, gout_ptr,
    N, d, D, HW, W, wp, CHW, low, high, two_inv_count,
    P: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PROJ: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    img = b.to(tl.int64) * CHW
    pred_ptr += img
    tgt_ptr += img
    grad_ptr += img
    t, t_mask, tok_off, k, k_mask = _token_tile(pid_t, N, d, wp, W, P, BLOCK_T, BLOCK_K)

    # The upstream gradient is read on the device: no host sync, and it may be any scale.
    scale = -tl.load(gout_ptr).to(tl.float32) * tl.load(lam_ptr + b) * two_inv_count
    if USE_PROJ:
        row = b.to(tl.int64) * N + t
        pj = tl.load(proj_ptr + row[:, None] * d + k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        pj = pj * (low - high)
    for j0 in range(0, D, BLOCK_D):
        j, j_mask, off, m, e = _residual_tile(pred_ptr, tgt_ptr, tok_off, t_mask, j0, D, HW, W, P, BLOCK_D)
        g = high * e
        if USE_PROJ:
            v = tl.load(v_ptr + k[:, None] * D + j[None, :], mask=k_mask[:, None] & j_mask[None, :], other=0.0)
            g = tl.dot(pj, v, g, input_precision=DOT_PREC)
        tl.store(grad_ptr + off, (g * scale).to(grad_ptr.dtype.element_ty), mask=m)


def _candidates(pred, N, D, d, B):
    if is_interpreted(_pca_loss_fwd_kernel):
        return interpreter_tiles(N, D, d)
    # float32 accuracy for the projection whatever the image dtype: the loss is a long sum.
    return gpu_tiles(N, D, d, B, pred.device, dot_precision(torch.float32, pred.device))


def _check_weight(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{_OP}: {name} must be a float, got {type(v).__name__}")
    if not (float(v) == float(v) and abs(float(v)) != float("inf")):
        raise ValueError(f"{_OP}: {name}={v} must be finite")


def _check_inputs(pred, target, basis, lam, p, low, high):
    """Metadata-only checks (they run on FakeTensors too); returns (B, C, H, W, N, d, D)."""
    check_tensor(pred, "pred", _OP, ndim=4, dtypes=IMAGE_DTYPES)
    dev = pred.device
    check_tensor(target, "target", _OP, ndim=4, dtypes=IMAGE_DTYPES, device=dev)
    if target.shape != pred.shape:
        raise ValueError(f"{_OP}: target has shape {tuple(target.shape)} but pred has {tuple(pred.shape)}")
    check_int(p, "p", _OP, 1)
    B, C, H, W = pred.shape
    check_patch(H, W, p, _OP, "pred")
    D = C * p * p
    check_tensor(basis, "basis", _OP, ndim=2, dtypes=(torch.float32,), device=dev)
    d = basis.shape[0]
    if basis.shape[1] != D or not 1 <= d <= D:
        raise ValueError(f"{_OP}: basis must be V_d of shape (d, {D}) with 1 <= d <= {D} for "
                         f"{C} channels and patch size {p}; got {tuple(basis.shape)}")
    check_tensor(lam, "lam", _OP, ndim=1, dtypes=(torch.float32,), device=dev)
    if lam.shape[0] != B:
        raise ValueError(f"{_OP}: lam must have shape (B,) = ({B},), got {tuple(lam.shape)}")
    if pred.numel() == 0:
        raise ValueError(f"{_OP}: pred is empty (shape {tuple(pred.shape)})")
    _check_weight(low, "low")
    _check_weight(high, "high")
    return B, C, H, W, (H // p) * (W // p), d, D


def _geometry(pred, basis, p):
    B, C, H, W = pred.shape
    d, D = basis.shape
    return B, C, H, W, (H // p) * (W // p), d, D


def _forward(pred, target, basis, lam, p, low, high, save_proj):
    """Launch the forward kernel on checked inputs; returns (loss, proj or an empty tensor)."""
    check_runnable(_pca_loss_fwd_kernel, pred.device, _OP)
    B, C, H, W, N, d, D = _geometry(pred, basis, p)
    use_proj = float(low) != float(high)
    store_proj = bool(save_proj) and use_proj
    proj = torch.empty((B, N, d) if store_proj else (0,), device=pred.device, dtype=torch.float32)
    v_cm = patch_major_to_channel_major(basis, p, C)

    def run(t):
        n_t = triton.cdiv(N, t.BLOCK_T)
        partial = torch.empty(n_t * B, device=pred.device, dtype=torch.float32)
        with device_guard(pred.device):
            _pca_loss_fwd_kernel[(n_t, B)](
                pred, target, v_cm, lam, proj, partial,
                N, d, D, H * W, W, W // p, C * H * W, float(low), float(high), 1.0 / (B * N),
                P=p, BLOCK_T=t.BLOCK_T, BLOCK_D=t.BLOCK_D, BLOCK_K=t.BLOCK_K,
                USE_PROJ=use_proj, STORE_PROJ=store_proj, DOT_PREC=t.prec,
                num_warps=t.num_warps, num_stages=t.num_stages,
            )
        return partial

    key = ("pca_loss_fwd", pred.device, pred.dtype, target.dtype, use_proj, store_proj)
    partial = launch_with_fallback(key, _candidates(pred, N, D, d, B), run)
    return partial.sum(), proj


def _backward(grad_out, pred, target, basis, lam, proj, p, low, high):
    """Launch the backward kernel; returns d(loss)/d(pred) in pred's dtype and NCHW layout."""
    check_runnable(_pca_loss_bwd_kernel, pred.device, _OP)
    B, C, H, W, N, d, D = _geometry(pred, basis, p)
    use_proj = float(low) != float(high)
    if use_proj and proj.numel() != B * N * d:
        raise RuntimeError(f"{_OP}: backward needs the projection saved by the forward pass; the "
                           f"forward ran without save_proj=True")
    grad = torch.empty_like(pred, memory_format=torch.contiguous_format)
    gout = grad_out.detach().reshape(()).to(device=pred.device, dtype=torch.float32).contiguous()
    v_cm = patch_major_to_channel_major(basis, p, C)

    def run(t):
        with device_guard(pred.device):
            _pca_loss_bwd_kernel[(triton.cdiv(N, t.BLOCK_T), B)](
                grad, pred, target, v_cm, lam, proj, gout,
                N, d, D, H * W, W, W // p, C * H * W, float(low), float(high), 2.0 / (B * N),
                P=p, BLOCK_T=t.BLOCK_T, BLOCK_D=t.BLOCK_D, BLOCK_K=t.BLOCK_K, USE_PROJ=use_proj,
                DOT_PREC=t.prec, num_warps=t.num_warps, num_stages=t.num_stages,
            )

    key = ("pca_loss_bwd", pred.device, pred.dtype, target.dtype, use_proj)
    launch_with_fallback(key, _candidates(pred, N, D, d, B), run)
    return grad


def pca_loss_forward(pred, target, basis, lam, p, low=1.0, high=0.1, save_proj=False):
    """Host launcher of the forward kernel, with checks. Returns (loss, proj); proj is
    V_d e (B, N, d) float32 when save_proj and low != high, else an empty tensor."""
    _check_inputs(pred, target, basis, lam, p, low, high)
    return _forward(pred, target, basis, lam, p, low, high, save_proj)


def pca_loss_backward(grad_out, pred, target, basis, lam, proj, p, low=1.0, high=0.1):
    """Host launcher of the backward kernel, with checks: d(loss)/d(pred) scaled by grad_out."""
    _check_inputs(pred, target, basis, lam, p, low, high)
    check_tensor(grad_out, "grad_out", _OP, dtypes=(torch.float32, torch.bfloat16, torch.float16),
                 device=pred.device, contiguous=False)
    if grad_out.numel() != 1:
        raise ValueError(f"{_OP}: grad_out must hold one element, got shape {tuple(grad_out.shape)}")
    return _backward(grad_out, pred, target, basis, lam, proj, p, low, high)


class PCALossFunction(torch.autograd.Function):
    """autograd.Function form (used on torch < 2.4): gradient for pred only."""

    @staticmethod
    def forward(ctx, pred, target, basis, lam, p, low, high):
        loss, proj = _forward(pred, target, basis, lam, p, low, high, save_proj=ctx.needs_input_grad[0])
        ctx.save_for_backward(pred, target, basis, lam, proj)
        ctx.p, ctx.low, ctx.high = p, low, high
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        pred, target, basis, lam, proj = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = _backward(grad_out, pred, target, basis, lam, proj, ctx.p, ctx.low, ctx.high)
        return grad, None, None, None, None, None, None


_fwd_op = None
if has_custom_op():

    @torch.library.custom_op("ldae::pca_loss_fwd", mutates_args=())
    def _pca_loss_fwd_op(
        pred: torch.Tensor, target: torch.Tensor, basis: torch.Tensor, lam: torch.Tensor,
        p: int, low: float, high: float, save_proj: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return _forward(pred, target, basis, lam, p, low, high, save_proj)

    @_pca_loss_fwd_op.register_fake
    def _pca_loss_fwd_fake(pred, target, basis, lam, p, low, high, save_proj):
        B, C, H, W = pred.shape
        d = basis.shape[0]
        store = save_proj and float(low) != float(high)
        loss = pred.new_empty((), dtype=torch.float32)
        proj = pred.new_empty((B, (H // p) * (W // p), d) if store else (0,), dtype=torch.float32)
        return loss, proj

    @torch.library.custom_op("ldae::pca_loss_bwd", mutates_args=())
    def _pca_loss_bwd_op(
        grad_out: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, basis: torch.Tensor,
        lam: torch.Tensor, proj: torch.Tensor, p: int, low: float, high: float,
    ) -> torch.Tensor:
        return _backward(grad_out, pred, target, basis, lam, proj, p, low, high)

    @_pca_loss_bwd_op.register_fake
    def _pca_loss_bwd_fake(grad_out, pred, target, basis, lam, proj, p, low, high):
        return torch.empty_like(pred, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        pred, target, basis, lam, p, low, high, _save = inputs
        ctx.save_for_backward(pred, target, basis, lam, output[1])
        ctx.p, ctx.low, ctx.high = p, low, high

    def _op_backward(ctx, grad_loss, _grad_proj):
        pred, target, basis, lam, proj = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = _pca_loss_bwd_op(grad_loss, pred, target, basis, lam, proj, ctx.p, ctx.low, ctx.high)
        return grad, None, None, None, None, None, None, None

    _pca_loss_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)
    _fwd_op = _pca_loss_fwd_op


def pca_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    basis: torch.Tensor,
    lam: torch.Tensor,
    p: int,
    low: float = 1.0,
    high: float = 0.1,
    *,
    kernels: str = "triton",
) -> torch.Tensor:
    """Weighted PCA-space reconstruction loss of l-DAE (see `reference.pca_loss_fast`).

    loss = mean over the B*N tokens of lam_b * (high |e|^2 + (low - high) |basis e|^2),
    e = patchify(target) - patchify(pred); with the full basis this is sum_i w_i r_i^2 of
    r = V e with w_i = low for the first d components and high for the rest. low = high = 1 is
    the plain squared error summed over each patch (MSE * C p^2).

    Args:
        pred: (B, C, H, W) prediction, float32 / bfloat16 / float16, contiguous.
        target: same shape (any of those dtypes), contiguous. Gets no gradient.
        basis: V_d, (d, C p^2) float32, orthonormal rows, MAE (p, p, C) patch order. No gradient.
        lam: (B,) float32 per-sample weights. No gradient.
        p: patch size (H and W divisible by it).
        low, high: the component weights (Python floats).
        kernels: 'triton' (fused kernels; on CPU only under TRITON_INTERPRET=1) or 'reference'.

    Returns:
        A 0-dim float32 tensor (accumulated in float32 whatever the input dtype), differentiable
        with respect to pred only; the gradient comes back in pred's dtype. The reduction is
        deterministic: the same inputs give the same loss bit for bit.
    """
    if kernels not in ("triton", "reference"):
        raise ValueError(f"{_OP}: kernels={kernels!r}; choose 'triton' or 'reference'")
    _check_inputs(pred, target, basis, lam, p, low, high)
    if kernels == "reference":
        return reference.pca_loss_fast(pred, target.detach(), basis.detach(), lam.detach(), p, low, high)
    low, high = float(low), float(high)
    target, basis, lam = target.detach(), basis.detach(), lam.detach()
    if _fwd_op is not None:
        save = torch.is_grad_enabled() and pred.requires_grad
        return _fwd_op(pred, target, basis, lam, p, low, high, save)[0]
    return PCALossFunction.apply(pred, target, basis, lam, p, low, high)


__all__ = ["pca_loss", "pca_loss_forward", "pca_loss_backward", "PCALossFunction"]
