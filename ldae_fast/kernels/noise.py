"""Fused l-DAE noise: image -> patchify -> latent -> add noise -> decode -> noisy image, for any
linear tokenizer (encoder E (d, D), decoder G (D, d); PCA is E = V_d, G = V_d^T).

One program owns BLOCK_T consecutive tokens of one image. It walks the patch dimension D in
chunks of BLOCK_D, loading each (BLOCK_T, BLOCK_D) tile straight from NCHW memory by index
arithmetic (no patchify copy), and accumulates z0 = (x - mu) E^T with tl.dot. It then draws eps
in registers, forms z_t = gamma_b z0 + sigma_b eps, and walks D again writing z_t G^T + mu back in
image layout. HBM traffic is one read and one write of the image (plus the small maps, which
stay in L2); the latent never leaves registers unless z0 / eps are asked for.

eps comes from Philox-4x32-10, the generator behind tl.randn, keyed on `seed` and a 64-bit counter
`offset + ((b * N + n) * d + k)` for sample b, token n, latent k. Same (seed, offset) -> the same
noise bit for bit; different samples / tokens / components -> different counters -> independent
draws. With a counter below 2**32 the value equals tl.randn(seed, counter).

Layers: `_latent_noise_kernel` (@triton.jit) -> `latent_noise_triton` (launcher, checks inputs)
-> `latent_noise` (public: torch.library op `ldae::latent_noise` on torch >= 2.4 so torch.compile
traces around it, an autograd.Function otherwise; or the plain-PyTorch path with kernels='reference').
"""

from typing import Optional, Tuple, Union

import torch

from .. import reference
from ..seeding import derive_seed
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

_OP = "latent_noise"
_MAX_OFFSET = 1 << 62  # keeps offset + B*N*d inside int64 inside the kernel


@triton.jit(do_not_specialize=["seed", "offset"])
def _latent_noise_kernel(
    x_ptr, out_ptr, v_ptr, g_ptr, mu_ptr, gamma_ptr, sigma_ptr, z0_ptr, eps_ptr,
    seed, offset,
    N, d, D, HW, W, wp, CHW,
    P: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    STORE_Z0: tl.constexpr, STORE_EPS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    # Batch offset in int64: B * C * H * W passes 2**31 at a few thousand 256px images.
    img = b.to(tl.int64) * CHW
    x_base = x_ptr + img
    o_base = out_ptr + img

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < N
    # Top-left pixel of each token's patch; P is constexpr so // and % become multiplies.
    tok_off = (t // wp) * (P * W) + (t % wp) * P
    k = tl.arange(0, BLOCK_K)
    k_mask = k < d

    # Pass 1: z0 = (x - mu) E^T. Patch elements run in (C, P, P) order (the maps and mean were
    # permuted to match), so a tile row is a set of P-pixel runs contiguous in NCHW memory.
    z = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j0 in range(0, D, BLOCK_D):
        j = j0 + tl.arange(0, BLOCK_D)
        j_mask = j < D
        el_off = (j // (P * P)) * HW + ((j // P) % P) * W + (j % P)
        m = t_mask[:, None] & j_mask[None, :]
        xt = tl.load(x_base + tok_off[:, None] + el_off[None, :], mask=m, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + j, mask=j_mask, other=0.0)
        # Padding columns give 0 - 0; padding rows are never stored, so no where() is needed.
        xt = xt - mu[None, :]
        v = tl.load(v_ptr + k[:, None] * D + j[None, :], mask=k_mask[:, None] & j_mask[None, :], other=0.0)
        z = tl.dot(xt, tl.trans(v), z, input_precision=DOT_PREC)

    # eps on a 64-bit counter split into Philox's first two 32-bit words, as tl.randn does.
    row = b.to(tl.int64) * N + t
    cnt = offset.to(tl.int64) + row[:, None] * d + k[None, :]
    c_lo = cnt.to(tl.uint32)
    c_hi = (cnt >> 32).to(tl.uint32)
    zero = c_lo * 0
    r0, r1, _, _ = tl.philox(seed, c_lo, c_hi, zero, zero)
    eps, _ = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))

    lat_mask = t_mask[:, None] & k_mask[None, :]
    lat_off = row[:, None] * d + k[None, :]
    if STORE_Z0:
        tl.store(z0_ptr + lat_off, z, mask=lat_mask)
    if STORE_EPS:
        tl.store(eps_ptr + lat_off, eps, mask=lat_mask)
    g = tl.load(gamma_ptr + b)
    s = tl.load(sigma_ptr + b)
    # Padding latents (k >= d) carry noise here but meet zero rows of G^T below.
    z = g * z + s * eps

    # Pass 2: x_noisy = z_t G^T + mu, written back where the tile came from. G^T arrives as a
    # (d, D) matrix like E (for PCA it is the same tensor), so both passes index it alike.
    for j0 in range(0, D, BLOCK_D):
        j = j0 + tl.arange(0, BLOCK_D)
        j_mask = j < D
        el_off = (j // (P * P)) * HW + ((j // P) % P) * W + (j % P)
        v = tl.load(g_ptr + k[:, None] * D + j[None, :], mask=k_mask[:, None] & j_mask[None, :], other=0.0)
        mu = tl.load(mu_ptr + j, mask=j_mask, other=0.0)
        o = tl.dot(z, v, input_precision=DOT_PREC) + mu[None, :]
        m = t_mask[:, None] & j_mask[None, :]
        tl.store(o_base + tok_off[:, None] + el_off[None, :], o.to(out_ptr.dtype.element_ty), mask=m)


def _check_inputs(x, basis, mean, gamma, sigma, p, seed, offset, return_z0, return_eps, decoder=None):
    """Metadata-only checks (they run on FakeTensors too); returns (B, C, H, W, N, d, D)."""
    check_tensor(x, "x", _OP, ndim=4, dtypes=IMAGE_DTYPES)
    dev = x.device
    check_int(p, "p", _OP, 1)
    B, C, H, W = x.shape
    check_patch(H, W, p, _OP)
    D = C * p * p
    check_tensor(basis, "basis", _OP, ndim=2, dtypes=(torch.float32,), device=dev)
    d = basis.shape[0]
    if basis.shape[1] != D or not 1 <= d <= D:
        raise ValueError(f"{_OP}: basis must be V_d of shape (d, {D}) with 1 <= d <= {D} for "
                         f"{C} channels and patch size {p}; got {tuple(basis.shape)}")
    if decoder is not None:
        # Any strides: the launcher copies G^T into the kernel's patch order anyway.
        check_tensor(decoder, "decoder", _OP, ndim=2, dtypes=(torch.float32,), device=dev, contiguous=False)
        if tuple(decoder.shape) != (D, d):
            raise ValueError(f"{_OP}: decoder must be G of shape (D, d) = ({D}, {d}) for the basis "
                             f"{tuple(basis.shape)}; got {tuple(decoder.shape)}")
    check_tensor(mean, "mean", _OP, ndim=1, dtypes=(torch.float32,), device=dev)
    if mean.shape[0] != D:
        raise ValueError(f"{_OP}: mean must have shape ({D},), got {tuple(mean.shape)}")
    for name, v in (("gamma", gamma), ("sigma", sigma)):
        check_tensor(v, name, _OP, ndim=1, dtypes=(torch.float32,), device=dev)
        if v.shape[0] != B:
            raise ValueError(f"{_OP}: {name} must have shape (B,) = ({B},), got {tuple(v.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{_OP}: x is empty (shape {tuple(x.shape)})")
    check_int(seed, "seed", _OP, 0, (1 << 63) - 1)
    check_int(offset, "offset", _OP, 0, _MAX_OFFSET)
    for name, v in (("return_z0", return_z0), ("return_eps", return_eps)):
        if not isinstance(v, bool):
            raise TypeError(f"{_OP}: {name} must be a bool, got {type(v).__name__}")
    N = (H // p) * (W // p)
    return B, C, H, W, N, d, D


def _launch(x, basis, mean, gamma, sigma, p, seed, offset, return_z0, return_eps, decoder=None):
    """Allocate and launch; inputs already checked. Returns (x_noisy, z0, eps), the last two
    empty (numel 0) unless asked for."""
    B, C, H, W = x.shape
    d, D = basis.shape
    N = (H // p) * (W // p)
    check_runnable(_latent_noise_kernel, x.device, _OP)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    lat = (B, N, d)
    z0 = torch.empty(lat if return_z0 else (0,), device=x.device, dtype=torch.float32)
    eps = torch.empty(lat if return_eps else (0,), device=x.device, dtype=torch.float32)
    v_cm = patch_major_to_channel_major(basis, p, C)
    # decoder None (PCA): pass 2 reads the very tensor pass 1 does, so its output is unchanged.
    g_cm = v_cm if decoder is None else patch_major_to_channel_major(decoder.t(), p, C)
    mu_cm = patch_major_to_channel_major(mean, p, C)
    if is_interpreted(_latent_noise_kernel):
        cands = interpreter_tiles(N, D, d)
    else:
        cands = gpu_tiles(N, D, d, B, x.device, dot_precision(x.dtype, x.device))

    def run(t):
        with device_guard(x.device):
            _latent_noise_kernel[(triton.cdiv(N, t.BLOCK_T), B)](
                x, out, v_cm, g_cm, mu_cm, gamma, sigma, z0, eps,
                int(seed), int(offset),
                N, d, D, H * W, W, W // p, C * H * W,
                P=p, BLOCK_T=t.BLOCK_T, BLOCK_D=t.BLOCK_D, BLOCK_K=t.BLOCK_K,
                STORE_Z0=return_z0, STORE_EPS=return_eps, DOT_PREC=t.prec,
                num_warps=t.num_warps, num_stages=t.num_stages,
            )

    launch_with_fallback((_OP, x.device, x.dtype, return_z0, return_eps), cands, run)
    return out, z0, eps


def latent_noise_triton(x, basis, mean, gamma, sigma, p, seed, offset=0, return_z0=False,
                        return_eps=False, decoder=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The host launcher: checks every argument, then runs the kernel (no autograd, no op
    registration). Returns (x_noisy, z0, eps); z0 / eps have numel 0 unless asked for."""
    _check_inputs(x, basis, mean, gamma, sigma, p, seed, offset, return_z0, return_eps, decoder)
    return _launch(x, basis, mean, gamma, sigma, p, seed, offset, return_z0, return_eps, decoder)


class LatentNoiseFunction(torch.autograd.Function):
    """The op for torch < 2.4 (and for callers who want an autograd.Function): no gradient."""

    @staticmethod
    def forward(ctx, x, basis, mean, gamma, sigma, p, seed, offset, return_z0, return_eps, decoder=None):
        outs = _launch(x, basis, mean, gamma, sigma, p, seed, offset, return_z0, return_eps, decoder)
        ctx.mark_non_differentiable(*outs)
        return outs

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - outputs are non-differentiable
        return (None,) * 11


_custom_op = None
if has_custom_op():

    @torch.library.custom_op("ldae::latent_noise", mutates_args=())
    def _latent_noise_op(
        x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor, gamma: torch.Tensor,
        sigma: torch.Tensor, p: int, seed: int, offset: int, return_z0: bool, return_eps: bool,
        decoder: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _launch(x, basis, mean, gamma, sigma, p, seed, offset, return_z0, return_eps, decoder)

    @_latent_noise_op.register_fake
    def _latent_noise_fake(x, basis, mean, gamma, sigma, p, seed, offset, return_z0, return_eps, decoder):
        B, C, H, W = x.shape
        d = basis.shape[0]
        N = (H // p) * (W // p)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        z0 = x.new_empty((B, N, d) if return_z0 else (0,), dtype=torch.float32)
        eps = x.new_empty((B, N, d) if return_eps else (0,), dtype=torch.float32)
        return out, z0, eps

    _custom_op = _latent_noise_op


def reference_eps(seed: int, offset: int, B: int, N: int, d: int, device) -> torch.Tensor:
    """The reference path's eps (B, N, d): sample b is torch.randn from a generator keyed on
    (seed, offset + b N d), the counter of its first element in the kernel's numbering.

    So, like the kernel's stream, a sample's noise depends on (seed, its counters) alone: a call
    on rows lo..lo+B-1 (offset = lo N d) draws exactly those rows of the call on the whole batch,
    which is what lets ranks and accumulated micro-batches draw what one process draws. The
    values are torch.randn's, not the kernel's Philox stream.
    """
    eps = torch.empty(B, N, d, device=device, dtype=torch.float32)
    gen = torch.Generator(device=device)
    for b in range(B):
        gen.manual_seed(derive_seed(seed, offset + b * N * d))
        eps[b] = torch.randn(N, d, generator=gen, device=device, dtype=torch.float32)
    return eps


def _reference_noise(x, basis, mean, gamma, sigma, p, seed, offset, decoder=None):
    """kernels='reference': the same math through reference.py with eps from `reference_eps`."""
    B, C, H, W = x.shape
    N = (H // p) * (W // p)
    eps = reference_eps(seed, offset, B, N, basis.shape[0], x.device)
    out, _ = reference.latent_noise(x, basis, mean, gamma, sigma, eps, p, decoder)
    z0 = (reference.patchify(x.float(), p) - mean.float()) @ basis.float().t()
    return out, z0, eps


def latent_noise(
    x: torch.Tensor,
    basis: torch.Tensor,
    mean: torch.Tensor,
    gamma: torch.Tensor,
    sigma: torch.Tensor,
    p: int,
    seed: int,
    offset: int = 0,
    return_z0: bool = False,
    return_eps: bool = False,
    *,
    decoder: Optional[torch.Tensor] = None,
    kernels: str = "triton",
) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Noise images in the d-dimensional latent of each patch of a linear tokenizer, in one pass
    over memory.

    z0 = (patchify(x) - mean) E^T, z_t = gamma_b z0 + sigma_b eps,
    x_noisy = unpatchify(z_t G^T + mean), E = basis, G = decoder (PCA: G = basis^T, so
    x_noisy = unpatchify(z_t basis + mean)); see `reference.latent_noise` for the spec.

    Args:
        x: (B, C, H, W) images, float32 / bfloat16 / float16, contiguous; H and W divisible by p.
        basis: the encoder E, (d, C p^2) float32, 1 <= d <= C p^2, in MAE's (p, p, C) patch
            order; for PCA V_d, orthonormal rows.
        mean: (C p^2,) float32 patch mean (the tokenizer's affine offset).
        decoder: the decoder G, (C p^2, d) float32 in the same patch order, for a tokenizer whose
            decoder is not basis^T (a patch-wise AE / VAE); None: G = basis^T.
        gamma, sigma: (B,) float32 per-sample coefficients.
        p: patch size.
        seed: 0 <= seed < 2**63, the Philox key.
        offset: 0 <= offset <= 2**62, the first counter; the noise of (sample b, token n,
            component k) uses counter offset + (b N + n) d + k. Drawing twice with
            offset += B N d, or with another seed, gives independent noise.
        return_z0, return_eps: also return z0 / eps, (B, N, d) float32.
        kernels: 'triton' (the fused kernel; on CPU only under TRITON_INTERPRET=1) or
            'reference' (plain PyTorch; eps from `reference_eps`, torch.randn keyed per sample
            on (seed, counter), so not the kernel's stream).

    Returns:
        x_noisy (x's dtype, contiguous), or the tuple (x_noisy, z0?, eps?) of what was asked,
        in that order. Nothing is differentiable: no gradient flows to x.
    """
    if kernels not in ("triton", "reference"):
        raise ValueError(f"{_OP}: kernels={kernels!r}; choose 'triton' or 'reference'")
    _check_inputs(x, basis, mean, gamma, sigma, p, seed, offset, return_z0, return_eps, decoder)
    if kernels == "reference":
        with torch.no_grad():
            out, z0, eps = _reference_noise(x, basis, mean, gamma, sigma, p, seed, offset, decoder)
    else:
        args = (x.detach(), basis.detach(), mean.detach(), gamma.detach(), sigma.detach(),
                p, seed, offset, return_z0, return_eps, None if decoder is None else decoder.detach())
        if _custom_op is not None:
            out, z0, eps = _custom_op(*args)
        else:
            out, z0, eps = LatentNoiseFunction.apply(*args)
    if not (return_z0 or return_eps):
        return out
    res = [out]
    if return_z0:
        res.append(z0)
    if return_eps:
        res.append(eps)
    return tuple(res)


def latent_noise_counter_span(x_shape, d: int, p: int) -> int:
    """Counters one call consumes: add this to `offset` for the next independent draw."""
    B, _, H, W = x_shape
    return B * (H // p) * (W // p) * d


__all__ = ["latent_noise", "latent_noise_triton", "reference_eps", "LatentNoiseFunction", "latent_noise_counter_span"]
