"""A figure grid as one PNG (Pillow only): rows of image cells under one line of column heads."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

LINE = 12  # header text line height in pixels


def to_pixels(x: torch.Tensor, denorm: Callable, scale: int) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> uint8 (B, H*scale, W*scale, 3), nearest-neighbour upscaled so
    small training resolutions stay legible."""
    x = denorm(x.detach().float().cpu()).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return x.permute(0, 2, 3, 1).contiguous()


def save_grid(columns: Sequence[torch.Tensor], heads: Sequence[str], path: str | Path, *,
              denorm: Optional[Callable] = None, scale: Optional[int] = None, pad: int = 2) -> Path:
    """columns[j]: (B, 3, H, W) normalised images of column j (row i = image i), under heads[j]."""
    from PIL import Image, ImageDraw, ImageFont

    if denorm is None:
        from ..data import denormalize as denorm
    B, _, H, W = columns[0].shape
    scale = scale or max(1, math.ceil(64 / W))
    pix = [to_pixels(c, denorm, scale) for c in columns]
    ch, cw, top = H * scale, W * scale, LINE + pad
    canvas = Image.new("RGB", (len(pix) * cw + (len(pix) + 1) * pad, top + B * ch + (B + 1) * pad),
                       (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for j, (col, head) in enumerate(zip(pix, heads)):
        x0 = pad + j * (cw + pad)
        draw.text((x0 + max(0.0, (cw - draw.textlength(head, font=font)) / 2), pad // 2), head,
                  fill=(0, 0, 0), font=font)
        for i in range(B):
            canvas.paste(Image.fromarray(col[i].numpy(), "RGB"), (x0, top + pad + i * (ch + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
