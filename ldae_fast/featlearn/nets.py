"""The two networks of the study, their losses, and hand-written gradients.

Diffusion (denoiser, tied layers, applied to each patch with the same weights W of shape (m, d)):
    f_p(W, z) = (1/sqrt m) sum_r sigma(<w_r, z^(p)>) w_r,   sigma(u) = u^2
trained on the DDPM (noise-prediction) loss at one time t, a mean over all n * 2 * d output
coordinates (what `F.mse_loss` computes; see docs/featlearn.md for why this normalization),
    L(W) = 1/(2 n d) sum_i sum_p E_eps || f_p(W, alpha x_i^(p) + beta eps^(p)) - eps^(p) ||^2,
    alpha = exp(-t), beta = sqrt(1 - exp(-2t)).

Classifier (one filter bank per class, W of shape (2, m, d); index 0 is class +1, 1 is class -1):
    F_j(W_j, x) = (1/m) sum_r sum_p sigma(<w_{j,r}, x^(p)>),  f = F_{+1} - F_{-1},
    L(W) = 1/n sum_i log(1 + exp(-y_i f(x_i))).

The expectation over eps in the diffusion loss is exact in closed form: with u = W z Gaussian
(mean c = alpha W a, covariance beta^2 G, G = W W^T) the loss only needs the second and fourth
moments of u, so one GD step costs O(n m d + m^2 d) instead of O(n_eps n m d) for sampling.
`diffusion_loss_mc` is the sampled version it is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def schedule(t: float) -> tuple[float, float]:
    """(alpha_t, beta_t) of the Ornstein-Uhlenbeck forward process used by the paper."""
    if t <= 0:
        raise ValueError(f"diffusion time t must be positive, got {t}")
    return math.exp(-t), math.sqrt(1.0 - math.exp(-2.0 * t))


def init_weights(shape: tuple[int, ...], sigma0: float, generator=None, dtype=torch.float64):
    return torch.randn(*shape, generator=generator, dtype=dtype) * sigma0


# --- diffusion model ------------------------------------------------------------------------------


def denoiser(W: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """f(W, z) for patches z (..., d) -> (..., d)."""
    return (z @ W.T).pow(2) @ W / math.sqrt(W.shape[0])


def _patches(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _loss_terms(W: torch.Tensor, x: torch.Tensor, alpha: float, beta: float):
    """The closed-form loss's building blocks: the patches X (N, d), the Gram matrix G = W W^T and
    its diagonal g, C = alpha X W^T (the mean of the pre-activations u = z W^T) and Q = E[u^2]."""
    m, d = W.shape
    X = _patches(x)
    G = W @ W.T
    g = torch.diagonal(G)
    C = alpha * (X @ W.T)
    Q = C.pow(2) + beta**2 * g
    return m, d, X, X.shape[0], G, g, C, Q


def diffusion_loss_closed(W: torch.Tensor, x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Exact E_eps of the DDPM loss for data x (n, P, d); differentiable by autograd."""
    m, d, X, N, G, g, C, Q = _loss_terms(W, x, alpha, beta)
    # E|f|^2 = (1/m) sum_rs G_rs E[u_r^2 u_s^2], and for Gaussian u,
    # E[u_r^2 u_s^2] = Q_r Q_s + 2 beta^4 G_rs^2 + 4 beta^2 c_r c_s G_rs.
    quartic = ((Q @ G) * Q).sum() + 2 * N * beta**4 * G.pow(3).sum()
    quartic = quartic + 4 * beta**2 * ((C @ (G * G)) * C).sum()
    # E<eps, f> = (2 beta / sqrt m) sum_r c_r G_rr: only the odd moment of eps survives.
    cross = (4 * beta / math.sqrt(m)) * (C @ g).sum()
    return (quartic / m - cross + N * d) / (N * d)


def diffusion_loss_and_grad(
    W: torch.Tensor, x: torch.Tensor, alpha: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form loss and its gradient w.r.t. W, written out to skip autograd's per-step cost."""
    m, d, X, N, G, g, C, Q = _loss_terms(W, x, alpha, beta)
    G2 = G * G
    QG = Q @ G
    CG2 = C @ G2
    colsum_C = C.sum(0)
    quartic = (QG * Q).sum() + 2 * N * beta**4 * (G2 * G).sum() + 4 * beta**2 * (CG2 * C).sum()
    cross = (4 * beta / math.sqrt(m)) * (colsum_C @ g)
    s = 1.0 / (N * d)
    loss = (quartic / m - cross + N * d) * s

    a = s / m
    dQ = 2 * a * QG
    # Every dL/dG term is symmetric, so the chain rule through G = W W^T gives 2 dL/dG W.
    dG = a * (Q.T @ Q + 6 * N * beta**4 * G2 + 8 * beta**2 * G * (C.T @ C))
    dC = 2 * C * dQ + 8 * beta**2 * a * CG2 - s * (4 * beta / math.sqrt(m)) * g
    dg = beta**2 * dQ.sum(0) - s * (4 * beta / math.sqrt(m)) * colsum_C
    grad = 2 * (dG @ W) + 2 * dg[:, None] * W + alpha * (dC.T @ X)
    return loss, grad


def _noise_chunks(X: torch.Tensor, n_eps: int, generator: torch.Generator | None, chunk: int | None):
    """n_eps standard normal draws of the patches X (N, d), as (k, N, d) batches of at most `chunk`
    draws (by default about 2^24 numbers a batch) to bound memory."""
    if chunk is None:
        chunk = max(1, min(n_eps, (1 << 24) // max(1, X.numel())))
    done = 0
    while done < n_eps:
        k = min(chunk, n_eps - done)
        yield torch.randn(k, *X.shape, generator=generator, dtype=X.dtype, device=X.device)
        done += k


def diffusion_loss_mc(
    W: torch.Tensor,
    x: torch.Tensor,
    alpha: float,
    beta: float,
    n_eps: int,
    generator: torch.Generator | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Sampled DDPM loss: n_eps noise draws per patch, drawn as a batch (in chunks to bound memory)."""
    X = _patches(x)
    total = W.new_zeros(())
    for eps in _noise_chunks(X, n_eps, generator, chunk):
        z = alpha * X + beta * eps
        total = total + (denoiser(W, z) - eps).pow(2).sum()
    return total / (X.numel() * n_eps)


def diffusion_loss_and_grad_mc(
    W: torch.Tensor,
    x: torch.Tensor,
    alpha: float,
    beta: float,
    n_eps: int,
    generator: torch.Generator | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled loss and autograd gradient, one backward per chunk so memory stays bounded."""
    X = _patches(x)
    loss = W.new_zeros(())
    grad = torch.zeros_like(W)
    for eps in _noise_chunks(X, n_eps, generator, chunk):
        Wr = W.detach().requires_grad_(True)
        with torch.enable_grad():
            part = (denoiser(Wr, alpha * X + beta * eps) - eps).pow(2).sum() / (X.numel() * n_eps)
            (gpart,) = torch.autograd.grad(part, Wr)
        loss = loss + part.detach()
        grad += gpart
    return loss, grad


# --- classifier -----------------------------------------------------------------------------------

_CLASS_SIGN = (1.0, -1.0)  # W[0] scores class +1, W[1] scores class -1


def _preacts(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """<w_{j,r}, x_i^(p)> as (n, P, 2, m): one matmul instead of a 4-index einsum."""
    n, P, d = x.shape
    return (x.reshape(n * P, d) @ W.reshape(-1, d).T).reshape(n, P, 2, -1)


def class_scores(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """F_j for W (2, m, d), x (n, P, d) -> (n, 2)."""
    return _preacts(W, x).pow(2).sum((1, 3)) / W.shape[1]


def classifier_output(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    Fj = class_scores(W, x)
    return Fj[:, 0] - Fj[:, 1]


def classifier_loss(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.softplus(-y * classifier_output(W, x)).mean()


def classifier_loss_and_grad(
    W: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n, P, d = x.shape
    m = W.shape[1]
    A = _preacts(W, x)
    Fj = A.pow(2).sum((1, 3)) / m
    margin = y * (Fj[:, 0] - Fj[:, 1])
    loss = F.softplus(-margin).mean()
    dl_df = -y * torch.sigmoid(-margin) / n  # d loss / d f_i
    sign = torch.tensor(_CLASS_SIGN, dtype=W.dtype, device=W.device)
    coef = dl_df[:, None] * sign[None, :]  # (n, 2)
    B = (coef[:, None, :, None] * A).reshape(n * P, -1)  # d loss / d preact, up to 2/m
    grad = (2.0 / m) * (B.T @ x.reshape(n * P, d)).reshape(W.shape)
    return loss, grad


def accuracy(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.where(classifier_output(W, x) > 0, 1.0, -1.0).to(y.dtype)
    return (pred == y).to(torch.float64).mean().item()


# --- feature-learning metrics ---------------------------------------------------------------------


def _mean_max_alignment(W: torch.Tensor, v: torch.Tensor) -> float:
    """mean over i of max_r |<w_r^(i), v_i>|; W is (m, d) shared, or (n, m, d) per sample."""
    if W.dim() == 2:
        inner = v @ W.T
    else:
        inner = torch.einsum("nmd,nd->nm", W, v)
    return inner.abs().amax(1).mean().item()


def feature_metrics(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """Signal learning and noise memorization of a trained W.

    signal = mean_i max_r |<w_r, x_i^(1)>| (for the synthetic data x_i^(1) = mu_{y_i}, so this is
    max_r |<w_r, mu_j>| averaged over the samples' classes), noise = mean_i max_r |<w_r, xi_i>|.
    For the classifier (W of shape (2, m, d)) w_r are the filters of the sample's own class y_i,
    the ones whose growth fits that sample.
    """
    if W.dim() == 3:
        if y is None:
            raise ValueError("classifier metrics need the labels y")
        Wy = W[(y < 0).long()]  # (n, m, d)
    else:
        Wy = W
    sig = _mean_max_alignment(Wy, x[:, 0])
    noi = _mean_max_alignment(Wy, x[:, 1])
    return {"signal": sig, "noise": noi, "ratio": sig / noi if noi > 0 else math.inf}
