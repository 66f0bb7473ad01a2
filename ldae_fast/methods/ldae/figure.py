"""Clean / noisy / denoised grid, like the paper's Figure 8, as one PNG (Pillow only).

Rows are images; columns are the clean image, then for each sigma the network input and the
network's output, both from the method's own sampler (`Method.sample`): the noising, the
schedule's gamma and noise.input_scaling are training's. Every sigma uses the same eps, so a row
shows one noise pattern growing rather than a fresh draw per column.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..sampling import device_of

LINE = 12  # header text line height in pixels


def header_height(labels: bool, pad: int) -> int:
    return 2 * LINE + pad if labels else 0


def figure_size(rows: int, n_sigmas: int, cell: int, pad: int = 2, labels: bool = True) -> tuple[int, int]:
    """(width, height) of the PNG: cells of `cell` px with `pad` px between and around them."""
    cols = 1 + 2 * n_sigmas
    return cols * cell + (cols + 1) * pad, rows * cell + (rows + 1) * pad + header_height(labels, pad)


@torch.no_grad()
def denoise_columns(model: nn.Module, method, images: torch.Tensor, sigmas: Sequence[float],
                    step: int = 0) -> list[torch.Tensor]:
    """[clean, noisy(s0), denoised(s0), noisy(s1), ...], each (B, 3, H, W) normalised, on CPU.
    The noise is that of training step `step` (method.sample)."""
    method = method.to(device_of(model))
    cols = [images.float().cpu()]
    for x_in, x_hat in method.sample(model, images, sigmas, step=step):
        cols += [x_in.float().cpu(), x_hat.float().cpu()]
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
    method,
    images: torch.Tensor,
    sigmas: Sequence[float],
    path: str | Path,
    *,
    step: int = 0,
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
    cols = denoise_columns(model, method, images, sigmas, step)
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


def method_figure(cfg, model: nn.Module, method, out_dir, *, images=None, step: int = 0) -> tuple[Path, str]:
    """MethodSpec.figure: the denoising grid at eval.figure_sigmas, as denoising.png."""
    if images is None:
        from ...data import build_eval_arrays
        images, _ = build_eval_arrays(cfg, "val", max_images=6, labels=False)
    sigmas = [float(s) for s in cfg.eval.figure_sigmas.split(",") if s.strip()]
    path = denoise_figure(model, method, images, sigmas, Path(out_dir) / "denoising.png", step=step)
    return path, f"clean / noisy / denoised at sigma {', '.join(f'{s:g}' for s in sigmas)}"
