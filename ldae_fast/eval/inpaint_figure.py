"""The inpainting grid of the DiffMAE supplement, as one PNG (Pillow only).

One row per (image, mask kind); columns: the original, the masked input (hidden patches at the
dataset mean), then the method's inpainting at each level t (by default 1000, 500, 0): the x_0 the
network predicts at that step of the reverse chain, visible patches kept, t = 0 the final sample.
The sampling itself is the method's (`method.sample`), the same noising and schedule as training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

LINE = 12


def _to_pixels(x: torch.Tensor, denorm: Callable, scale: int) -> torch.Tensor:
    x = denorm(x.detach().float().cpu()).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return x.permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def inpaint_columns(method, model: nn.Module, images: torch.Tensor, levels: Sequence[int],
                    masks: Sequence[str], steps: Optional[int] = None) -> tuple[list[list[torch.Tensor]], list[str]]:
    """(rows, labels): rows[i] is [original, masked, sample at each level] for row i, where the
    rows run over masks, then images."""
    rows, labels = [], []
    for kind in masks:
        out = method.sample(model, images, levels, mask=kind, steps=steps)
        masked = out[0][0]
        for b in range(images.shape[0]):
            rows.append([images[b:b + 1].float(), masked[b:b + 1]] + [o[1][b:b + 1] for o in out])
            labels.append(kind)
    return rows, labels


def inpaint_figure(method, model: nn.Module, images: torch.Tensor, path: str | Path, *,
                   levels: Sequence[int] = (1000, 500, 0), masks: Sequence[str] = ("random", "center"),
                   steps: Optional[int] = None, denorm: Optional[Callable] = None,
                   scale: Optional[int] = None, pad: int = 2) -> Path:
    """Write the grid to `path` (PNG) and return it."""
    from PIL import Image, ImageDraw, ImageFont

    if denorm is None:
        from ldae_fast.data import denormalize as denorm
    B, _, H, W = images.shape
    scale = scale or max(1, math.ceil(64 / W))
    rows, _ = inpaint_columns(method, model, images, levels, masks, steps)
    heads = ["original", "masked"] + [f"t={t}" for t in levels]
    ch, cw = H * scale, W * scale
    top = LINE + pad
    fw = len(heads) * cw + (len(heads) + 1) * pad
    fh = top + len(rows) * ch + (len(rows) + 1) * pad
    canvas = Image.new("RGB", (fw, fh), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = Image.fromarray(_to_pixels(img, denorm, scale)[0].numpy(), "RGB")
            canvas.paste(tile, (pad + j * (cw + pad), top + pad + i * (ch + pad)))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, text in enumerate(heads):
        tw = draw.textlength(text, font=font)
        draw.text((pad + j * (cw + pad) + max(0.0, (cw - tw) / 2), pad // 2), text, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
