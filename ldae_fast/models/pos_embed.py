"""Fixed 2-D sine-cosine position embeddings (not learned), laid out as in MAE.

The first half of the channels encodes the column (x) index and the second half the row (y)
index; each half is [sin(pos * omega_i), cos(pos * omega_i)] with omega_i = 10000^(-i / (dim/4)).
Keeping MAE's layout means an encoder trained here carries the same position code as MAE/DiT
checkpoints, so features and fine-tuning recipes transfer without surprises.
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) embedding [sin | cos], computed in float64 then cast to float32."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    angles = pos.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False,
              device: torch.device | str | None = None) -> torch.Tensor:
    """(grid_h * grid_w [+1], dim) embedding for a row-major patch grid.

    With ``cls_token`` a zero row comes first: the class token gets no position, as in MAE.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64, device=device),
        torch.arange(grid_w, dtype=torch.float64, device=device),
        indexing="ij",
    )
    emb = torch.cat([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)
    return emb
