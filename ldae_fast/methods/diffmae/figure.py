"""The inpainting grid of the DiffMAE supplement, as one PNG (Pillow only).

One row per (image, mask kind); columns: the original, the masked input (hidden patches at the
dataset mean), then the method's inpainting at each level t (by default 1000, 500, 0): the x_0 the
network predicts at that step of the reverse chain, visible patches kept, t = 0 the final sample.
The sampling itself is the method's (`method.sample`), the same noising and schedule as training.
`video_inpaint_figure` is the clips' version (original / masked / output rows over frames).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..sampling import device_of

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


def video_inpaint_figure(method, model: nn.Module, clips: torch.Tensor, path: str | Path, *,
                         mask: str = "random", steps: Optional[int] = None, denorm: Optional[Callable] = None,
                         scale: Optional[int] = None, pad: int = 2) -> Path:
    """The video figure: per clip three rows, the original, the masked input (hidden tubelets at
    the dataset mean) and the final sample (t = 0), over the frames the method noises and
    predicts (one time slice per tubelet: temporal stride diffmae.tubelet, 2 for the paper's
    2x16x16 patches). clips: (B, C, T, H, W) normalised."""
    from PIL import Image, ImageDraw, ImageFont

    if denorm is None:
        from ldae_fast.data import denormalize as denorm
    B, _, _, H, W = clips.shape
    scale = scale or max(1, math.ceil(64 / W))
    (masked, final), = method.sample(model, clips, (0,), mask=mask, steps=steps)
    original = method.slice_frames(clips.float())
    Tf = original.shape[2]
    heads = ["original", "masked", "output"]
    label_w = 52
    ch, cw = H * scale, W * scale
    top = LINE + pad
    fw = label_w + Tf * cw + (Tf + 1) * pad
    fh = top + 3 * B * ch + (3 * B + 1) * pad + (B - 1) * pad * 2
    canvas = Image.new("RGB", (fw, fh), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    first = getattr(method, "time_slice", 0)
    stride = getattr(method, "tubelet", 1)
    for j in range(Tf):
        text = f"frame {first + j * stride}"
        tw = draw.textlength(text, font=font)
        draw.text((label_w + pad + j * (cw + pad) + max(0.0, (cw - tw) / 2), pad // 2), text, fill=(0, 0, 0), font=font)
    y = top + pad
    for b in range(B):
        for name, x in zip(heads, (original, masked, final)):
            draw.text((2, y + ch // 2 - LINE // 2), name, fill=(0, 0, 0), font=font)
            frames = x[b:b + 1].transpose(1, 2)[0]  # (T', C, H, W)
            pix = _to_pixels(frames, denorm, scale)
            for j in range(Tf):
                canvas.paste(Image.fromarray(pix[j].numpy(), "RGB"), (label_w + pad + j * (cw + pad), y))
            y += ch + pad
        y += pad * 2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def method_figure(cfg, model: nn.Module, method, out_dir, *, images=None, step: int = 0) -> tuple[Path, str]:
    """MethodSpec.figure: the inpainting grid (images) or the clip rows (video), inpainting.png /
    video_inpainting.png; the sampler runs where the model is."""
    method = method.to(device_of(model))
    T, n = cfg.diffmae.num_timesteps, cfg.diffmae.sample_steps
    if cfg.data.num_frames:
        from ...data.video import video_eval_clips
        path = video_inpaint_figure(method, model, video_eval_clips(cfg, 4), Path(out_dir) / "video_inpainting.png")
        return path, (f"original / masked / output frames at temporal stride {cfg.diffmae.tubelet}; "
                      f"{cfg.diffmae.mask_ratio:.0%} random masks, {n} reverse steps")
    if images is None:
        from ...data import build_eval_arrays
        images, _ = build_eval_arrays(cfg, "val", max_images=4, labels=False)
    levels = (T, T // 2, 0)
    path = inpaint_figure(method, model, images[:4], Path(out_dir) / "inpainting.png", levels=levels)
    return path, (f"original / masked / inpainted at t {', '.join(map(str, levels))}; random and "
                  f"center masks, {n} reverse steps")
