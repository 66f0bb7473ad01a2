"""Fused adaLN modulation of a LayerNorm without affine weights (DiT blocks), forward and backward.

    y = LN(x) * (1 + scale[:, None, :]) + shift[:, None, :],   LN(x) = (x - mean) * rstd,
x (B, T, C) tokens, shift and scale (B, C) per sample, rstd = 1 / sqrt(var + eps) over C.

Eager PyTorch runs this as a LayerNorm kernel plus two broadcast element-wise kernels, each
reading and writing a (B, T, C) tensor; the fused forward reads x once and writes y once.

Forward: a program owns BLOCK_R tokens of one sample; each row of C channels fits one register
tile (BLOCK_C = next power of two >= C), so mean and variance come from one read in float32
(two-pass over registers, no E[x^2] - E[x]^2 cancellation). It writes y in x's dtype and the
per-row mean and rstd (float32, (B*T,)) that the backward needs instead of re-reducing.
Backward: with g = dy * (1 + scale) and xhat = (x - mean) * rstd,
    dx = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat)),
    dscale[b] = sum_t dy * xhat,   dshift[b] = sum_t dy.
The sums over tokens span programs: a program walks `rows_per_prog` tokens of one sample in
BLOCK_R-row trips, accumulating in registers, and writes one float32 partial row per program
into (B, n_chunks, C); torch sums the chunks. A fixed reduction tree, so gradients are the same
bit for bit run after run (no atomics), and the partials are a few rows per sample, not per token.

Layouts: x and dy may be any views whose channel dim has unit stride (the token and batch
strides are passed to the kernels, so slices and expanded batches cost no copy); a strided
channel dim is copied once by the launcher. shift and scale may be row-strided views, such as
the `.chunk(6, dim=-1)` pieces of a DiT block's (B, 6C) modulation. x, shift and scale may each
be float32, bfloat16 or float16 (under autocast the residual stream and the modulation need not
agree); all arithmetic is float32; dx comes back in x's dtype, dshift / dscale in shift's /
scale's. C is limited to 65536: the whole row lives in registers (past C = 8192 the backward
spills to local memory on sm_90 and slows down, but stays correct).

Layers: the two @triton.jit kernels -> `adaln_layernorm_forward` / `adaln_layernorm_backward`
(launchers with checks) -> `adaln_layernorm` (public: torch.library ops `ldae::adaln_layernorm_fwd`
/ `ldae::adaln_layernorm_bwd` with register_autograd on torch >= 2.4, `AdaLNLayerNormFunction`
otherwise; or reference.adaln_layernorm with kernels='reference').
"""

from typing import NamedTuple, Optional, Tuple

import torch

from .. import reference
from ._common import (
    IMAGE_DTYPES,
    check_runnable,
    check_tensor,
    device_guard,
    has_custom_op,
    is_interpreted,
    launch_with_fallback,
    next_pow2,
    num_sms,
    tl,
    triton,
)

_OP = "adaln_layernorm"
MAX_C = 1 << 16


@triton.jit
def _adaln_ln_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, y_ptr, mean_ptr, rstd_ptr,
    T, C, n_chunks, stride_xb, stride_xt, stride_shift, stride_scale, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_chunks
    t = (pid % n_chunks) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    t_mask = t < T
    c_mask = c < C
    m = t_mask[:, None] & c_mask[None, :]
    # The int64 sample offset goes into the base pointers so per-element offsets stay int32.
    b64 = b.to(tl.int64)
    x_ptr += b64 * stride_xb
    y_ptr += b64 * T * C
    mean_ptr += b64 * T
    rstd_ptr += b64 * T

    x = tl.load(x_ptr + t[:, None] * stride_xt + c[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    # Padding lanes must not add (0 - mean)^2 to the variance.
    xc = tl.where(m, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    shift = tl.load(shift_ptr + b64 * stride_shift + c, mask=c_mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b64 * stride_scale + c, mask=c_mask, other=0.0).to(tl.float32)
    y = (xc * rstd[:, None]) * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(y_ptr + t[:, None] * C + c[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + t, mean, mask=t_mask)
    tl.store(rstd_ptr + t, rstd, mask=t_mask)


@triton.jit
def _adaln_ln_bwd_kernel(
    dy_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_ptr, dscale_ptr,
    T, C, n_chunks, rows_per_prog, stride_dyb, stride_dyt, stride_xb, stride_xt, stride_scale,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STORE_DX: tl.constexpr, STORE_DMOD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_chunks
    chunk = pid % n_chunks
    b64 = b.to(tl.int64)
    dy_ptr += b64 * stride_dyb
    x_ptr += b64 * stride_xb
    dx_ptr += b64 * T * C
    mean_ptr += b64 * T
    rstd_ptr += b64 * T
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    gain = 1.0 + tl.load(scale_ptr + b64 * stride_scale + c, mask=c_mask, other=0.0).to(tl.float32)

    acc_dshift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_dscale = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row0 = chunk * rows_per_prog
    for r in range(0, rows_per_prog, BLOCK_R):
        t = row0 + r + tl.arange(0, BLOCK_R)
        # The chunk's own end as well as T, so rows_per_prog need not be a multiple of BLOCK_R.
        t_mask = (t < T) & (t < row0 + rows_per_prog)
        m = t_mask[:, None] & c_mask[None, :]
        dy = tl.load(dy_ptr + t[:, None] * stride_dyt + c[None, :], mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + t[:, None] * stride_xt + c[None, :], mask=m, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + t, mask=t_mask, other=0.0)
        rstd = tl.load(rstd_ptr + t, mask=t_mask, other=0.0)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
        if STORE_DMOD:
            acc_dshift += tl.sum(dy, axis=0)
            acc_dscale += tl.sum(dy * xhat, axis=0)
        if STORE_DX:
            g = dy * gain[None, :]
            c1 = tl.sum(g * xhat, axis=1) / C
            c2 = tl.sum(g, axis=1) / C
            dx = rstd[:, None] * (g - c2[:, None] - xhat * c1[:, None])
            tl.store(dx_ptr + t[:, None] * C + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
    if STORE_DMOD:
        part = (b64 * n_chunks + chunk) * C + c
        tl.store(dshift_ptr + part, acc_dshift, mask=c_mask)
        tl.store(dscale_ptr + part, acc_dscale, mask=c_mask)


class RowTiles(NamedTuple):
    """One launch configuration of the row kernels."""

    BLOCK_R: int  # tokens per tile
    BLOCK_C: int  # channels, padded to a power of two
    rows_per_prog: int  # backward only: tokens one program walks (a multiple of BLOCK_R)
    num_warps: int
    num_stages: int


def _tiles(B: int, T: int, C: int, device: torch.device, backward: bool) -> list:
    """Launch configurations, best first."""
    if is_interpreted(_adaln_ln_fwd_kernel):
        # The interpreter pays per program and per trip; the backward still takes two trips per
        # program and several programs per sample so the tests exercise the cross-program sum.
        r = min(4 if backward else 16, next_pow2(T))
        return [RowTiles(r, next_pow2(C), 2 * r, 4, 1)]
    return gpu_row_tiles(B, T, C, num_sms(device))


def gpu_row_tiles(B: int, T: int, C: int, sms: int) -> list:
    """The GPU's launch configurations for a GPU with `sms` multiprocessors, best first; the
    rest halve the rows per tile (fewer registers) down to one."""
    BLOCK_C = next_pow2(C)
    # About 2K elements per tile at C = 768 / 1024 (two rows): enough bytes in flight per
    # program to stay memory-bound. Warps follow the tile at 8 elements (one 16-byte bf16
    # vector) per thread: ptxas for sm_90 then gives the backward 64 registers at C = 1024 and
    # no spills up to C = 8192 (32 warps); wider rows spill but still run.
    r = min(64, max(1, 2048 // BLOCK_C), next_pow2(T))
    # The backward splits each sample's tokens into at most 4 programs per SM in all (what fits
    # at 64 registers and 8 warps): one wave with no half-empty tail, and a few partial rows
    # per sample to sum instead of one per tile.
    per_sample = max(1, 4 * sms // max(B, 1))
    out = []
    while True:
        rpp = -(-T // per_sample)
        rpp = -(-rpp // r) * r
        warps = min(32, max(4, r * BLOCK_C // 256))
        out.append(RowTiles(r, BLOCK_C, rpp, warps, 1))
        if r == 1:
            return out
        r //= 2


def _unit_stride_c(t: torch.Tensor) -> torch.Tensor:
    # A strided channel dim turns every row load into a gather; one copy is cheaper.
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{_OP}: eps must be a float, got {type(eps).__name__}")
    if not (float(eps) >= 0.0 and float(eps) != float("inf")):
        raise ValueError(f"{_OP}: eps={eps} must be finite and >= 0")


def _check_inputs(x, shift, scale, eps):
    """Metadata-only checks (they run on FakeTensors too); returns (B, T, C)."""
    check_tensor(x, "x", _OP, ndim=3, dtypes=IMAGE_DTYPES, contiguous=False)
    B, T, C = x.shape
    if C < 1:
        raise ValueError(f"{_OP}: x must have at least one channel, got shape {tuple(x.shape)}")
    if C > MAX_C:
        raise ValueError(f"{_OP}: C={C} channels exceed the kernel's limit of {MAX_C} (a row is "
                         f"held in registers); use kernels='reference'")
    for name, v in (("shift", shift), ("scale", scale)):
        check_tensor(v, name, _OP, ndim=2, dtypes=IMAGE_DTYPES, device=x.device, contiguous=False)
        if tuple(v.shape) != (B, C):
            raise ValueError(f"{_OP}: {name} must have shape (B, C) = ({B}, {C}) for x of shape "
                             f"{tuple(x.shape)}, got {tuple(v.shape)}")
    _check_eps(eps)
    return B, T, C


def _forward(x, shift, scale, eps, out_dtype=None):
    """Launch the forward kernel on checked inputs; returns (y, mean, rstd), y in out_dtype
    (None: x's)."""
    check_runnable(_adaln_ln_fwd_kernel, x.device, _OP)
    B, T, C = x.shape
    y = torch.empty((B, T, C), device=x.device, dtype=out_dtype or x.dtype)
    mean = torch.empty((B * T,), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if y.numel() == 0:
        return y, mean, rstd
    x, shift, scale = _unit_stride_c(x), _unit_stride_c(shift), _unit_stride_c(scale)

    def run(t):
        n_chunks = triton.cdiv(T, t.BLOCK_R)
        with device_guard(x.device):
            _adaln_ln_fwd_kernel[(B * n_chunks,)](
                x, shift, scale, y, mean, rstd,
                T, C, n_chunks, x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), float(eps),
                BLOCK_R=t.BLOCK_R, BLOCK_C=t.BLOCK_C, num_warps=t.num_warps, num_stages=t.num_stages,
            )

    key = ("adaln_layernorm_fwd", x.device, x.dtype, shift.dtype, scale.dtype, y.dtype, next_pow2(C))
    launch_with_fallback(key, _tiles(B, T, C, x.device, backward=False), run)
    return y, mean, rstd


def _backward(dy, x, shift, scale, mean, rstd, need_dx, need_dmod):
    """Launch the backward kernel; returns (dx, dshift, dscale), each empty when not asked for."""
    check_runnable(_adaln_ln_bwd_kernel, x.device, _OP)
    B, T, C = x.shape
    dev = x.device
    dx = torch.empty((B, T, C) if need_dx else (0,), device=dev, dtype=x.dtype)
    if x.numel() == 0 or not need_dmod:
        # With no tokens the sums over them are zero and nothing is launched; without need_dmod
        # these are the empty placeholders the op's fixed output arity needs.
        mod_shape = (B, C) if need_dmod else (0,)
        dshift = torch.zeros(mod_shape, device=dev, dtype=shift.dtype)
        dscale = torch.zeros(mod_shape, device=dev, dtype=scale.dtype)
        if x.numel() == 0 or not need_dx:
            return dx, dshift, dscale
    dy, x, scale = _unit_stride_c(dy), _unit_stride_c(x), _unit_stride_c(scale)

    def run(t):
        n_chunks = triton.cdiv(T, t.rows_per_prog)
        shape = (B, n_chunks, C) if need_dmod else (0,)
        parts = (torch.empty(shape, device=dev, dtype=torch.float32),
                 torch.empty(shape, device=dev, dtype=torch.float32))
        with device_guard(dev):
            _adaln_ln_bwd_kernel[(B * n_chunks,)](
                dy, x, scale, mean, rstd, dx, parts[0], parts[1],
                T, C, n_chunks, t.rows_per_prog, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
                scale.stride(0),
                BLOCK_R=t.BLOCK_R, BLOCK_C=t.BLOCK_C, STORE_DX=bool(need_dx), STORE_DMOD=bool(need_dmod),
                num_warps=t.num_warps, num_stages=t.num_stages,
            )
        return parts

    key = ("adaln_layernorm_bwd", dev, dy.dtype, x.dtype, scale.dtype, next_pow2(C), need_dx, need_dmod)
    part_shift, part_scale = launch_with_fallback(key, _tiles(B, T, C, dev, backward=True), run)
    if need_dmod:
        dshift = part_shift.sum(1).to(shift.dtype)
        dscale = part_scale.sum(1).to(scale.dtype)
    return dx, dshift, dscale


def _check_out_dtype(out_dtype):
    if out_dtype is not None and out_dtype not in IMAGE_DTYPES:
        raise TypeError(f"{_OP}: out_dtype={out_dtype} must be None or one of "
                        f"{', '.join(str(d) for d in IMAGE_DTYPES)}")


def adaln_layernorm_forward(x, shift, scale, eps=1e-6, out_dtype=None):
    """Host launcher of the forward kernel, with checks. Returns (y, mean, rstd): y (B, T, C) in
    out_dtype (None: x's dtype), contiguous; mean and rstd per token, (B*T,) float32."""
    _check_inputs(x, shift, scale, eps)
    _check_out_dtype(out_dtype)
    return _forward(x, shift, scale, eps, out_dtype)


def adaln_layernorm_backward(dy, x, shift, scale, mean, rstd, need_dx=True, need_dmod=True):
    """Host launcher of the backward kernel, with checks. Returns (dx, dshift, dscale) in the
    dtypes of x, shift and scale; dx has numel 0 unless need_dx, dshift / dscale unless need_dmod."""
    B, T, C = _check_inputs(x, shift, scale, 0.0)
    check_tensor(dy, "dy", _OP, ndim=3, dtypes=IMAGE_DTYPES, device=x.device, contiguous=False)
    if dy.shape != x.shape:
        raise ValueError(f"{_OP}: dy has shape {tuple(dy.shape)} but x has {tuple(x.shape)}")
    for name, v in (("mean", mean), ("rstd", rstd)):
        check_tensor(v, name, _OP, ndim=1, dtypes=(torch.float32,), device=x.device)
        if v.shape[0] != B * T:
            raise ValueError(f"{_OP}: {name} must have shape (B*T,) = ({B * T},) as saved by the "
                             f"forward, got {tuple(v.shape)}")
    for name, v in (("need_dx", need_dx), ("need_dmod", need_dmod)):
        if not isinstance(v, bool):
            raise TypeError(f"{_OP}: {name} must be a bool, got {type(v).__name__}")
    return _backward(dy, x, shift, scale, mean, rstd, need_dx, need_dmod)


class AdaLNLayerNormFunction(torch.autograd.Function):
    """autograd.Function form (used on torch < 2.4): gradients for x, shift and scale."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps, out_dtype=None):
        y, mean, rstd = _forward(x, shift, scale, eps, out_dtype)
        ctx.save_for_backward(x, shift, scale, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, shift, scale, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dshift, dscale = _backward(dy, x, shift, scale, mean, rstd, need[0], need[1] or need[2])
        return (dx if need[0] else None, dshift if need[1] else None, dscale if need[2] else None, None, None)


_fwd_op = None
if has_custom_op():

    @torch.library.custom_op("ldae::adaln_layernorm_fwd", mutates_args=())
    def _adaln_fwd_op(
        x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
        out_dtype: Optional[torch.dtype] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(x, shift, scale, eps, out_dtype)

    @_adaln_fwd_op.register_fake
    def _adaln_fwd_fake(x, shift, scale, eps, out_dtype=None):
        B, T, C = x.shape
        y = x.new_empty((B, T, C), dtype=out_dtype or x.dtype)
        mean = x.new_empty((B * T,), dtype=torch.float32)
        return y, mean, torch.empty_like(mean)

    @torch.library.custom_op("ldae::adaln_layernorm_bwd", mutates_args=())
    def _adaln_bwd_op(
        dy: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
        mean: torch.Tensor, rstd: torch.Tensor, need_dx: bool, need_dmod: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward(dy, x, shift, scale, mean, rstd, need_dx, need_dmod)

    @_adaln_bwd_op.register_fake
    def _adaln_bwd_fake(dy, x, shift, scale, mean, rstd, need_dx, need_dmod):
        B, T, C = x.shape
        dx = x.new_empty((B, T, C) if need_dx else (0,))
        dshift = shift.new_empty((B, C) if need_dmod else (0,))
        dscale = scale.new_empty((B, C) if need_dmod else (0,))
        return dx, dshift, dscale

    def _setup_context(ctx, inputs, output):
        x, shift, scale, _eps, _out_dtype = inputs
        # shift is kept only for its dtype; it is a view of a tensor the block saves anyway.
        ctx.save_for_backward(x, shift, scale, output[1], output[2])

    def _op_backward(ctx, dy, _dmean, _drstd):
        x, shift, scale, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dshift, dscale = _adaln_bwd_op(dy, x, shift, scale, mean, rstd, need[0], need[1] or need[2])
        return (dx if need[0] else None, dshift if need[1] else None, dscale if need[2] else None, None, None)

    _adaln_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)
    _fwd_op = _adaln_fwd_op


def adaln_layernorm(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    *,
    kernels: str = "triton",
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """LayerNorm without affine weights, then adaLN modulation (see `reference.adaln_layernorm`):
    y = LN(x) * (1 + scale[:, None, :]) + shift[:, None, :].

    Args:
        x: (B, T, C) tokens, float32 / bfloat16 / float16; any strides over B and T (a strided
            channel dim is copied once). 1 <= C <= 65536.
        shift, scale: (B, C), each float32 / bfloat16 / float16 (need not match x); row-strided
            views such as ``mod.chunk(6, dim=-1)`` pieces are read in place.
        eps: added to the variance (Python float >= 0).
        kernels: 'triton' (fused kernels; on CPU only under TRITON_INTERPRET=1) or 'reference'.
        out_dtype: y's dtype (None: x's). Under bf16 autocast with a float32 residual stream,
            bfloat16 writes what the next Linear reads, with no float32 tensor in between; the
            gradient dy then arrives in that dtype and dx still comes back in x's.

    Returns:
        y (B, T, C), contiguous, in out_dtype (x's by default), computed in float32. Differentiable with respect
        to x, shift and scale (any subset); gradients come back in each input's dtype, and the
        sums over tokens are deterministic (the same inputs give the same gradients bit for bit).
    """
    if kernels not in ("triton", "reference"):
        raise ValueError(f"{_OP}: kernels={kernels!r}; choose 'triton' or 'reference'")
    _check_inputs(x, shift, scale, eps)
    _check_out_dtype(out_dtype)
    if kernels == "reference":
        y = reference.adaln_layernorm(x, shift, scale, eps)
        return y if out_dtype is None else y.to(out_dtype)
    if _fwd_op is not None:
        return _fwd_op(x, shift, scale, float(eps), out_dtype)[0]
    return AdaLNLayerNormFunction.apply(x, shift, scale, float(eps), out_dtype)


__all__ = ["adaln_layernorm", "adaln_layernorm_forward", "adaln_layernorm_backward", "AdaLNLayerNormFunction"]
