"""Plain-PyTorch versions of every kernel: the specification the Triton kernels are tested against.

Shapes: images (B, C, H, W); tokens (B, N, D) with N = (H/p)(W/p) and D = C p^2 in MAE's order
(p, p, C) inside a patch; a PCA basis V is (D, D) with orthonormal rows, V_d = V[:d] is (d, D);
the mean mu is (D,). Nothing here is fast on purpose: it is written to be obviously right.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), row-major patches, (p, p, C) order inside a patch."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(t: torch.Tensor, p: int, H: int, W: int, C: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, p*p*C) -> (B, C, H, W)."""
    B, N, D = t.shape
    h, w = H // p, W // p
    if N != h * w or D != p * p * C:
        raise ValueError(f"tokens {tuple(t.shape)} do not match image {C}x{H}x{W} with patch {p}")
    t = t.reshape(B, h, w, p, p, C)
    t = torch.einsum("nhwpqc->nchpwq", t)
    return t.reshape(B, C, H, W)


def latent_noise(
    x: torch.Tensor,
    basis: torch.Tensor,
    mean: torch.Tensor,
    gamma: torch.Tensor,
    sigma: torch.Tensor,
    eps: torch.Tensor,
    p: int,
    decoder: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The l-DAE noise op with a given eps, for any linear tokenizer.

    z0 = (patchify(x) - mu) E^T, z_t = gamma_b z0 + sigma_b eps, x_noisy = unpatchify(z_t G^T + mu),
    with the encoder E = `basis` (d, D) and the decoder G = `decoder` (D, d); decoder None is PCA's
    G = V_d^T, so x_noisy = unpatchify(z_t V_d + mu). gamma, sigma are (B,); eps is (B, N, d).
    Returns (x_noisy, z0), computed in float32 and returned in x's dtype. The components of x the
    decoder's range does not hold are dropped, as in the paper: the network sees only the
    d-dimensional latent, mapped back to pixels.
    """
    B, C, H, W = x.shape
    dt = x.dtype
    tok = patchify(x.float(), p)
    V = basis.float()
    z0 = (tok - mean.float()) @ V.t()
    zt = gamma.float().view(B, 1, 1) * z0 + sigma.float().view(B, 1, 1) * eps.float()
    back = zt @ V if decoder is None else zt @ decoder.float().t()
    out = unpatchify(back + mean.float(), p, H, W, C)
    return out.to(dt), z0.to(dt)


def pca_weights(D: int, d: int, low: float = 1.0, high: float = 0.1, device=None) -> torch.Tensor:
    """w_i of the loss: `low` for the first d principal components, `high` for the rest."""
    w = torch.full((D,), float(high), device=device)
    w[:d] = low
    return w


def pca_loss_full(
    pred: torch.Tensor,
    target: torch.Tensor,
    basis_full: torch.Tensor,
    lam: torch.Tensor,
    d: int,
    p: int,
    low: float = 1.0,
    high: float = 0.1,
) -> torch.Tensor:
    """The loss the slow way: residual r = V (patchify(target) - patchify(pred)) in the full (D, D)
    PCA basis, loss = mean over samples and tokens of lambda_b * sum_i w_i r_i^2."""
    e = patchify(target.float(), p) - patchify(pred.float(), p)
    r = e @ basis_full.float().t()
    w = pca_weights(r.shape[-1], d, low, high, device=r.device)
    per_token = (r.square() * w).sum(-1)
    return (lam.float().view(-1, 1) * per_token).mean()


def pca_loss_fast(
    pred: torch.Tensor,
    target: torch.Tensor,
    basis: torch.Tensor,
    lam: torch.Tensor,
    p: int,
    low: float = 1.0,
    high: float = 0.1,
) -> torch.Tensor:
    """The same loss through the identity sum_i w_i r_i^2 = high |e|^2 + (low - high) |V_d e|^2,
    valid because V is orthonormal; needs only V_d (d, D)."""
    e = patchify(target.float(), p) - patchify(pred.float(), p)
    proj = e @ basis.float().t()
    per_token = high * e.square().sum(-1) + (low - high) * proj.square().sum(-1)
    return (lam.float().view(-1, 1) * per_token).mean()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for (B, heads, N, hd) tensors, in float32 outside autocast.

    Under autocast its policy decides, as for any eager model: the two matmuls run in the
    autocast dtype (bf16) and softmax in float32 on CUDA. So the 'math' backend of a bf16 run is
    the plain eager attention one would write, with the (B, heads, N, N) scores materialised.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    a = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (F.softmax(a, dim=-1) @ v.float()).to(q.dtype)


def adaln_layernorm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """adaLN modulation of a LayerNorm without affine weights, as in DiT blocks:
    LN(x) * (1 + scale) + shift for x (B, T, C) and per-sample shift, scale (B, C), computed in
    float32 and returned in x's dtype."""
    xn = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (xn * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1)).to(x.dtype)
