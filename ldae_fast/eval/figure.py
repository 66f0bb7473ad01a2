"""Clean / noisy / denoised grid, like the paper's Figure 8, as one PNG (Pillow only).

Rows are images; columns are the clean image, then for each sigma the noisy network input (noise
added in the PCA latent space, `reference.latent_noise`) and the network's output. Every sigma uses
the same eps, so a row shows one noise pattern growing rather than a fresh draw per column.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ldae_fast import reference

from .features import frozen, module_device

LINE = 12  # header text line height in pixels


def header_height(labels: bool, pad: int) -> int:
    return 2 * LINE + pad if labels else 0


def figure_size(rows: int, n_sigmas: int, cell: int, pad: int = 2, labels: bool = True) -> tuple[int, int]:
    """(width, height) of the PNG: cells of `cell` px with `pad` px between and around them."""
    cols = 1 + 2 * n_sigmas
    return cols * cell + (cols + 1) * pad, rows * cell + (rows + 1) * pad + header_height(labels, pad)


def gamma_for(sigma: float, schedule: str = "sigma_linear") -> float:
    """gamma paired with a given sigma: 1 in the final recipe (variance exploding); the
    variance-preserving schedules of the trajectory have gamma^2 + sigma^2 = 1."""
    if schedule == "sigma_linear":
        return 1.0
    if sigma > 1:
        raise ValueError(f"sigma={sigma} > 1 is not reachable with the variance-preserving "
                         f"schedule {schedule!r}")
    return math.sqrt(1.0 - sigma * sigma)


@torch.no_grad()
def denoise_columns(model: nn.Module, tokenizer, images: torch.Tensor, sigmas: Sequence[float],
                    seed: int = 0, schedule: str = "sigma_linear") -> list[torch.Tensor]:
    """[clean, noisy(s0), denoised(s0), noisy(s1), ...], each (B, 3, H, W) normalised, on CPU."""
    device = module_device(model)
    x = images.to(device).float()
    B, _, H, W = x.shape
    p = int(tokenizer.patch_size)
    basis = tokenizer.basis.to(device).float()
    mean = tokenizer.mean.to(device).float()
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(B, (H // p) * (W // p), basis.shape[0], generator=gen).to(device)
    cols = [x.cpu()]
    with frozen(model):
        for s in sigmas:
            sig = torch.full((B,), float(s), device=device)
            gam = torch.full((B,), gamma_for(float(s), schedule), device=device)
            noisy, _ = reference.latent_noise(x, basis, mean, gam, sig, eps, p)
            den = model(noisy, sig).float()
            cols += [noisy.cpu(), den.cpu()]
    return cols


def _to_pixels(x: torch.Tensor, denorm: Callable, scale: int) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> uint8 (B, H*scale, W*scale, 3), nearest-neighbour upscaled so
    small training resolutions stay legible."""
    x = denorm(x.float()).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return x.permute(0, 2, 3, 1).contiguous()


def _column_labels(sigmas: Sequence[float]) -> list[tuple[str, str]]:
    out = [("", "clean")]
    for s in sigmas:
        out += [(f"sigma={s:g}", "noisy"), ("", "denoised")]
    return out


def denoise_figure(
    model: nn.Module,
    tokenizer,
    images: torch.Tensor,
    sigmas: Sequence[float],
    path: str | Path,
    *,
    seed: int = 0,
    schedule: str = "sigma_linear",
    denorm: Optional[Callable] = None,
    scale: Optional[int] = None,
    pad: int = 2,
    labels: bool = True,
) -> Path:
    """Write the grid to `path` (PNG) and return the path. `scale` defaults to the smallest integer
    that makes each cell at least 64 px wide, room for the column labels."""
    from PIL import Image, ImageDraw, ImageFont

    if denorm is None:
        from ldae_fast.data import denormalize as denorm
    B, _, H, W = images.shape
    if scale is None:
        scale = max(1, math.ceil(64 / W))
    cols = denoise_columns(model, tokenizer, images, sigmas, seed, schedule)
    pix = [_to_pixels(c, denorm, scale) for c in cols]
    ch, cw = H * scale, W * scale
    n_sig = len(sigmas)
    fw, fh = figure_size(B, n_sig, cw, pad, labels)
    fh += (ch - cw) * B  # non-square images: rows are ch tall
    canvas = Image.new("RGB", (fw, fh), (255, 255, 255))
    top = header_height(labels, pad)
    for j, col in enumerate(pix):
        for i in range(B):
            tile = Image.fromarray(col[i].numpy(), "RGB")
            canvas.paste(tile, (pad + j * (cw + pad), top + pad + i * (ch + pad)))
    if labels:
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        for j, (line1, line2) in enumerate(_column_labels(sigmas)):
            x0 = pad + j * (cw + pad)
            for k, text in enumerate((line1, line2)):
                if not text:
                    continue
                tw = draw.textlength(text, font=font)
                # The sigma label spans its noisy/denoised pair.
                span = 2 * cw + pad if k == 0 else cw
                draw.text((x0 + max(0.0, (span - tw) / 2), pad // 2 + k * LINE), text,
                          fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
