"""Image decode, augmentation and normalisation.

All randomness comes from a `torch.Generator` the caller passes, so the data stream can derive
one generator per sample (or per batch) from its position and a resumed run redraws exactly the
same crops and flips.

RandomResizedCrop + flip: `sample_crop_flip` is the one place a box and a flip are drawn (box
first, then flip, a fixed amount of randomness per image); the paths that apply them:
- PIL (`train_transform`), used by the CPU decode workers: the JPEG is decoded at a reduced DCT
  scale when the crop allows it (`Image.draft`), and crop + resize happen in one resampling step;
- tensors: `crop_resize_flip` for one image (after GPU (nvjpeg) decode, whose boxes the workers
  draw), `random_resized_crop_batch` for a batch of same-size images (the synthetic and resident
  sets: one `grid_sample` call).
So a box means the same thing in every path. (eval/linear_probe.py and eval/finetune.py follow
their papers' recipes with their own draws.)

Evaluation rule (`eval_resize_size`): for a target side S >= 224 (ImageNet scale) the shorter
image side is resized to round(S * 256 / 224) and the centre S x S is kept, the usual 0.875
crop ratio; for S < 224 (Tiny ImageNet, the synthetic set, CPU demos) the shorter side is resized
to exactly S and the centre S x S is kept, because such small images are already tightly framed
and cutting their border would throw away an eighth of the object.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, NamedTuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..seeding import derive_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)

ImageLike = Union[Image.Image, bytes, bytearray, memoryview]


# data/sources.py imports the derivation under this name.
mix_seed = derive_seed


def generator_for(*xs: int) -> torch.Generator:
    """A CPU torch.Generator seeded by `derive_seed(*xs)`."""
    return torch.Generator().manual_seed(derive_seed(*xs))


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread, then restore the setting.

    Data-side tensors are small (one batch), so intra-op threads gain little, and on a shared,
    oversubscribed CPU their OpenMP barriers spin-wait for scheduler slices: measured 20x slower
    per batch with 2 threads than with 1 on a loaded 2-core machine. Never held across a
    `yield`, so the caller's own compute keeps its thread count.
    """
    prev = torch.get_num_threads()
    if prev == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


# Normalisation ------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1).to(device)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1).to(device)
    return mean, std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 in 0..255, or float in [0, 1] -> float32 normalised per channel."""
    mean, std = _mean_std(x.device)
    if x.dtype == torch.uint8:
        # One conversion pass and two in-place passes; the scale 1/255 folds into mean and std.
        return x.to(torch.float32).sub_(mean * 255.0).mul_(1.0 / (std * 255.0))
    return x.to(torch.float32).sub(mean).div_(std)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize`, clamped to [0, 1] (for figures)."""
    mean, std = _mean_std(x.device)
    return (x.to(torch.float32) * std + mean).clamp_(0.0, 1.0)


# PIL helpers -------------------------------------------------------------------------------
# Default of data.max_image_pixels: well under PIL's bomb warning (~89 MP), above any photo a
# training set needs (ImageNet's largest are ~20 MP); 64 MP of RGB is ~190 MB decoded.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than allowed; refused before decoding."""


def open_image(data: ImageLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A lazily decoded PIL image (only the header is parsed until pixels are needed); larger
    than `max_pixels` (width x height, from the header) raises ImageTooLarge."""
    img = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(bytes(data)))
    if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
        raise ImageTooLarge(f"image of {img.size[0]}x{img.size[1]} = {img.size[0] * img.size[1] / 1e6:.0f} MP "
                            f"exceeds data.max_image_pixels={max_pixels}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited on white, not on whatever colour
    the fully transparent pixels happen to store (often black, which would be a false edge)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float greyscale: PIL's direct conversion clips at 255, so rescale first.
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# Crop geometry -----------------------------------------------------------------------------
class CropBox(NamedTuple):
    left: int
    top: int
    width: int
    height: int


def sample_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = DEFAULT_RATIO,
    gen: torch.Generator | None = None,
) -> CropBox:
    """Random box of area fraction in `scale` and aspect (w/h) log-uniform in `ratio`.

    Draws a fixed amount of randomness (10 tries x 4 numbers) whatever the outcome, so the
    generator is left in the same state for the same input size.
    """
    area = float(width * height)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    tries = torch.rand(10, 4, generator=gen, dtype=torch.float64).tolist()
    if scale[0] >= 1.0:
        # data.crop='center' (scale (1, 1)): the largest centred square, DiT/ADM's center crop.
        side = min(width, height)
        return CropBox((width - side) // 2, (height - side) // 2, side, side)
    for u_area, u_ratio, u_x, u_y in tries:
        target = area * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(lo + u_ratio * (hi - lo))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = min(int(u_x * (width - w + 1)), width - w)
            top = min(int(u_y * (height - h + 1)), height - h)
            return CropBox(left, top, w, h)
    # No try fitted (extreme aspect images): the largest centred box with an allowed aspect.
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, max(1, int(round(width / ratio[0])))
    elif aspect > ratio[1]:
        w, h = max(1, int(round(height * ratio[1]))), height
    else:
        w, h = width, height
    return CropBox((width - w) // 2, (height - h) // 2, w, h)


def sample_flip(hflip: bool, gen: torch.Generator | None = None) -> bool:
    u = float(torch.rand(1, generator=gen, dtype=torch.float64))
    return hflip and u < 0.5


def sample_crop_flip(
    width: int,
    height: int,
    scale: tuple[float, float],
    hflip: bool,
    gen: torch.Generator | None = None,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> tuple[CropBox, bool]:
    """RandomResizedCrop's box and the horizontal flip of one image, drawn from `gen` in that
    order (the flip is drawn even when `hflip` is off, so the draws do not depend on it)."""
    box = sample_crop_box(width, height, scale, ratio, gen)
    return box, sample_flip(hflip, gen)


def eval_resize_size(size: int) -> int:
    """Shorter-side length before the centre crop (see the module docstring for the rule)."""
    return int(round(size * 256 / 224)) if size >= 224 else size


def center_crop_box(width: int, height: int, size: int) -> CropBox:
    """The box, in original pixels, that resize-shorter-side + centre-crop keeps."""
    side = size * min(width, height) / eval_resize_size(size)
    side_w, side_h = min(side, width), min(side, height)
    left = (width - side_w) / 2.0
    top = (height - side_h) / 2.0
    return CropBox(left, top, side_w, side_h)  # type: ignore[arg-type]  # float box is fine


# PIL transforms ----------------------------------------------------------------------------
def _resample_box(img: Image.Image, box: CropBox, size: int) -> Image.Image:
    """Crop `box` (original pixels) and resize it to size x size in one resampling step,
    decoding a JPEG at 1/2, 1/4 or 1/8 scale first when the box stays >= size after it."""
    full_w, full_h = img.size
    if img.format == "JPEG" and getattr(img, "tile", None):
        want = (
            max(1, math.ceil(full_w * size / max(box.width, 1e-6))),
            max(1, math.ceil(full_h * size / max(box.height, 1e-6))),
        )
        res = img.draft(None, want)
        if res is not None:
            f = full_w / res[1][2]
            box = CropBox(box.left / f, box.top / f, box.width / f, box.height / f)  # type: ignore[arg-type]
    img = to_rgb(img)
    region = (box.left, box.top, box.left + box.width, box.top + box.height)
    # Bilinear (antialiased by PIL when shrinking), like the tensor path; bicubic costs twice
    # as much on small images for no measurable gain in pretraining.
    return img.resize((size, size), Image.Resampling.BILINEAR, box=region)


def train_transform(
    data: ImageLike,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = DEFAULT_RATIO,
    hflip: bool = True,
    gen: torch.Generator | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """Encoded bytes or a PIL image -> RandomResizedCrop + flip -> uint8 (3, size, size).

    Raises whatever PIL raises on a corrupt image, ImageTooLarge past `max_pixels`; the caller
    counts either as a bad sample.
    """
    img = open_image(data, max_pixels)
    box, flip = sample_crop_flip(img.size[0], img.size[1], scale, hflip, gen, ratio)
    out = _resample_box(img, box, size)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pil_to_tensor(out)


def eval_transform(data: ImageLike, size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded bytes or a PIL image -> resize + centre crop -> uint8 (3, size, size)."""
    img = open_image(data, max_pixels)
    box = center_crop_box(img.size[0], img.size[1], size)
    return pil_to_tensor(_resample_box(img, box, size))


# Tensor transforms (synthetic data, GPU-decoded images) ---------------------------------------
def crop_resize_flip(img: torch.Tensor, box: CropBox, size: int, flip: bool) -> torch.Tensor:
    """(C, H, W) tensor on any device -> crop `box`, resize to size x size, optional h-flip.

    uint8 in, uint8 out (rounded); float in, float out. Bilinear with antialiasing, so a large
    crop shrunk to a small side does not alias.
    """
    l, t = int(box.left), int(box.top)
    crop = img[:, t : t + int(box.height), l : l + int(box.width)]
    x = crop.unsqueeze(0).to(torch.float32)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x[0]
    if flip:
        x = x.flip(-1)
    if img.dtype == torch.uint8:
        return x.round_().clamp_(0, 255).to(torch.uint8)
    return x.to(img.dtype)


def crop_resize_flip_batch(
    imgs: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int
) -> torch.Tensor:
    """Batched `crop_resize_flip` for same-size images (B, C, H, W) in one `grid_sample` call.

    boxes: (B, 4) float (left, top, width, height) in pixels; flips: (B,) bool. Bilinear without
    antialiasing: meant for crops that are enlarged or kept (the synthetic set crops its own
    S x S images back to S x S); for strong shrinking use `crop_resize_flip`.
    """
    B, _, H, W = imgs.shape
    b = boxes.to(device=imgs.device, dtype=torch.float32)
    # Output pixel j (normalised x_o) samples input x_i = a * x_o + c; with align_corners=False
    # this maps the output's pixel grid onto the box [left, left + width] exactly.
    ax = b[:, 2] / W
    cx = (2 * b[:, 0] + b[:, 2]) / W - 1
    ay = b[:, 3] / H
    cy = (2 * b[:, 1] + b[:, 3]) / H - 1
    ax = torch.where(flips.to(imgs.device), -ax, ax)
    theta = torch.zeros(B, 2, 3, device=imgs.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = ax, cx, ay, cy
    grid = F.affine_grid(theta, [B, imgs.shape[1], size, size], align_corners=False)
    x = F.grid_sample(imgs.to(torch.float32), grid, mode="bilinear", padding_mode="border",
                      align_corners=False)
    if imgs.dtype == torch.uint8:
        return x.round_().clamp_(0, 255).to(torch.uint8)
    return x.to(imgs.dtype)


def random_resized_crop_tensor(
    img: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = DEFAULT_RATIO,
    hflip: bool = True,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Tensor twin of `train_transform` for an already decoded (C, H, W) image."""
    box, flip = sample_crop_flip(img.shape[-1], img.shape[-2], scale, hflip, gen, ratio)
    return crop_resize_flip(img, box, size, flip)


def random_resized_crop_batch(
    imgs: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    hflip: bool,
    gen: torch.Generator | None = None,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> torch.Tensor:
    """RandomResizedCrop + flip of same-size images (B, C, H, W) on their device: a box and a
    flip per image from `gen`, in batch order, then one `crop_resize_flip_batch` call."""
    H, W = imgs.shape[-2:]
    boxes, flips = [], []
    for _ in range(imgs.shape[0]):
        box, flip = sample_crop_flip(W, H, scale, hflip, gen, ratio)
        boxes.append(box)
        flips.append(flip)
    return crop_resize_flip_batch(imgs, torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips), size)


# GPU (nvjpeg) decode ---------------------------------------------------------------------------
def gpu_decode_available() -> bool:
    """CUDA present and torchvision's decode_jpeg importable (imported lazily: optional)."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:
        return False
    return True


def decode_jpegs(datas: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor | None]:
    """JPEG byte tensors (uint8, 1-D, on the CPU) -> RGB uint8 (3, H, W) images on `device`.

    One batched decode call first (nvjpeg on CUDA); if it fails, each image alone, then PIL on
    the CPU for the ones the decoder rejects (CMYK, progressive oddities). None marks an image
    that nothing could decode: the caller counts it as a bad sample.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    with warnings.catch_warnings():
        # torchvision >= 0.29 warns on every call that its codecs move to torchcodec; the call
        # still works, and one batch per step would repeat that warning all run long.
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_jpegs(datas, device, decode_jpeg, ImageReadMode.RGB)


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device | str, decode_jpeg: Any,
                  rgb: Any) -> list[torch.Tensor | None]:
    try:
        return list(decode_jpeg(datas, mode=rgb, device=device))
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    for d in datas:
        try:
            out.append(decode_jpeg(d, mode=rgb, device=device))
            continue
        except RuntimeError:
            pass
        try:
            out.append(pil_to_tensor(to_rgb(open_image(d.numpy().tobytes()))).to(device))
        except Exception:  # untrusted bytes: any failure of the decoder means a bad sample
            out.append(None)
    return out
