"""Built-in synthetic image set: labelled shapes on cluttered backgrounds, no download.

Every image is a pure function of (seed, index): its random numbers come from a generator seeded
by the pair, and the rendering is vectorised over the whole set with torch. So any index range
can be generated on its own (the train split is [0, N), the val split the next block), the set
is identical on every machine and every run, and 2048 images of 32x32 take a few tens of ms.

Class c = shape kind (c mod 8) x texture (c // 8 mod 6), then a hue band for classes past 48.
Kinds: disc, square, ring, cross, triangle, striped disc (orientation set by the class),
checkerboard square, soft blob. Position, size, rotation (except for the oriented stripes),
colours, background gradient, low-frequency clutter, two distractor dots and pixel noise are
random per image, and with the default 8 classes the colour carries no class information. So the
class is a question of shape and texture, not of mean colour: raw pixels are a weak linear
feature, while an encoder that has learned shapes separates the classes well.

Two more kinds (`data.synthetic_kind`), each keyed on its own tag so no image repeats another
kind's: 'gratings' (the demo's: the class is the orientation of a muted two-colour grating, a
property of every patch's local structure that no colour statistic carries) and 'layouts' (three
identical dots whose arrangement is the class: a bag of patches is the same for every class).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..seeding import derive_seed
from .transforms import single_thread

NUM_KINDS = 8
NUM_TEXTURES = 6
# The dataset is fixed like a real one: the training seed changes model init and data order,
# never the images, so runs with different seeds see the same data.
DATASET_SEED = 0
# Per-image random numbers: scalar parameters, then a 4x4 RGB clutter field, then pixel noise.
_NUM_PARAMS = 32


def synthetic_val_size(num_images: int, num_classes: int) -> int:
    """Size of the val split: a quarter of the train split, at least 8 images per class."""
    return max(num_images // 4, 8 * num_classes)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N,) hue/sat/value in [0, 1] -> (N, 3) RGB."""
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h * 6.0, 6.0)
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1)


def _soft(x: torch.Tensor, sharp: float) -> torch.Tensor:
    """Soft step (about one pixel wide), so edges are anti-aliased rather than jagged."""
    return torch.sigmoid(x * sharp)


def _shape_mask(kind: int, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, sharp: float) -> torch.Tensor:
    """Coverage in [0, 1] of shape `kind` in rotated coordinates (u, v), size r: (n, S, S)."""
    rad = torch.sqrt(u * u + v * v)
    if kind == 0:  # disc
        return _soft(r - rad, sharp)
    if kind == 1:  # square (side chosen so its area is close to the disc's)
        return _soft(0.88 * r - torch.maximum(u.abs(), v.abs()), sharp)
    if kind == 2:  # ring
        return _soft(0.28 * r - (rad - 0.72 * r).abs(), sharp)
    if kind == 3:  # cross
        arm_a = _soft(r - u.abs(), sharp) * _soft(0.32 * r - v.abs(), sharp)
        arm_b = _soft(r - v.abs(), sharp) * _soft(0.32 * r - u.abs(), sharp)
        return torch.maximum(arm_a, arm_b)
    if kind == 4:  # equilateral triangle pointing "up" in (u, v)
        d = torch.maximum(u.abs() * 0.8660254 + v * 0.5, -v)
        return _soft(0.62 * r - d, sharp)
    if kind == 5:  # disc of stripes; the orientation is part of the class (set by the caller)
        stripes = _soft(torch.sin(u * (2 * math.pi / (0.55 * r))), 3.0)
        return _soft(r - rad, sharp) * stripes
    if kind == 6:  # checkerboard square
        f = 2 * math.pi / (0.8 * r)
        checks = _soft(torch.sin(u * f) * torch.sin(v * f), 4.0)
        return _soft(0.9 * r - torch.maximum(u.abs(), v.abs()), sharp) * checks
    # 7: soft Gaussian blob
    return torch.exp(-(rad * rad) / (2 * (0.5 * r) ** 2))


def _texture(tex: int, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Brightness modulation in [0, 1] inside the shape: 1 = solid."""
    period = 0.45 * r
    w = 2 * math.pi / period
    if tex == 0:
        return torch.ones_like(u)
    if tex == 1:  # stripes along u
        return _soft(torch.sin(u * w), 3.0)
    if tex == 2:  # stripes along v
        return _soft(torch.sin(v * w), 3.0)
    if tex == 3:  # diagonal stripes
        return _soft(torch.sin((u + v) * (w / math.sqrt(2))), 3.0)
    if tex == 4:  # concentric rings
        return _soft(torch.sin(torch.sqrt(u * u + v * v) * w), 3.0)
    # 5: dots
    return 1.0 - _soft(torch.sin(u * w) * torch.sin(v * w) - 0.5, 4.0)


@lru_cache(maxsize=8)
def _upsample_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst, src) bilinear interpolation weights: U @ X @ U.T upsamples a small field X far
    faster than F.interpolate does on many tiny images."""
    eye = torch.eye(src).unsqueeze(0)
    return F.interpolate(eye, size=dst, mode="linear", align_corners=False)[0].T.contiguous()


def _keyed_uniforms(indices: torch.Tensor, per: int, *key_prefix: int) -> torch.Tensor:
    """(n, per) uniforms, row i from its own generator keyed on (*key_prefix, index): an image
    depends on its key and index only, never on which other images share the batch."""
    rnd = torch.empty(indices.numel(), per)
    for row, idx in enumerate(indices.tolist()):
        g = torch.Generator().manual_seed(derive_seed(*key_prefix, idx))
        torch.rand(per, generator=g, out=rnd[row])
    return rnd


def _pixel_grid(s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(yy, xx): pixel-centre coordinates in [-1, 1]; one pixel is 2/s wide."""
    lin = (torch.arange(s, dtype=torch.float32) + 0.5) * (2.0 / s) - 1.0
    return torch.meshgrid(lin, lin, indexing="ij")


def _gradient_background(p: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor
                         ) -> tuple[torch.Tensor, ...]:
    """(brightness (n,), two colours (n, 3, 1, 1) from p[:, 0:6], a linear ramp (n, s, s) in the
    direction p[:, 6]); the brightness is what a foreground keeps its distance from."""
    n = p.shape[0]
    bg_v = 0.2 + 0.6 * p[:, 0]
    bg_a = _hsv_to_rgb(p[:, 1], 0.5 * p[:, 2], bg_v).view(n, 3, 1, 1)
    bg_b = _hsv_to_rgb(p[:, 3], 0.5 * p[:, 4], (bg_v + 0.25 * (p[:, 5] - 0.5)).clamp(0, 1)).view(n, 3, 1, 1)
    ang = p[:, 6] * 2 * math.pi
    ramp = (xx * (0.5 * torch.cos(ang)).view(n, 1, 1)).add_(yy * (0.5 * torch.sin(ang)).view(n, 1, 1)).add_(0.5)
    return bg_v, bg_a, bg_b, ramp


def _render(indices: torch.Tensor, num_classes: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = indices.numel()
    s = size
    labels = torch.remainder(indices, num_classes).to(torch.int64)
    rnd = _keyed_uniforms(indices, _NUM_PARAMS + 3 * 4 * 4 + 3 * s * s, seed)
    p = rnd[:, :_NUM_PARAMS]
    clutter = rnd[:, _NUM_PARAMS : _NUM_PARAMS + 48].view(n, 3, 4, 4)
    # Uniform -> approximately normal pixel noise (sum of uniforms would cost more draws).
    noise = rnd[:, _NUM_PARAMS + 48 :].view(n, 3, s, s).sub_(0.5).mul_(math.sqrt(12.0))

    kind = torch.remainder(labels, NUM_KINDS)
    variant = torch.div(labels, NUM_KINDS, rounding_mode="floor")
    tex = torch.remainder(variant, NUM_TEXTURES)
    band = torch.div(variant, NUM_TEXTURES, rounding_mode="floor")
    num_bands = int(band.max()) + 1 if n else 1

    yy, xx = _pixel_grid(s)
    sharp = s / 2.0

    def col(i: int) -> torch.Tensor:
        return p[:, i].view(n, 1, 1)

    # Background: a two-colour linear gradient in a random direction, plus 4x4 clutter.
    # (In-place ops throughout: this loop is memory bound and every temporary costs.)
    bg_v, bg_a, bg_b, ramp = _gradient_background(p, xx, yy)
    up = _upsample_matrix(4, s)
    img = torch.matmul(torch.matmul(up, (clutter - 0.5) * 0.35), up.T)
    img.add_(bg_a).addcmul_(bg_b - bg_a, ramp.unsqueeze(1))

    # Two distractor dots of random colour (not part of any class).
    for j in range(2):
        cx, cy, rr = col(7 + 4 * j) * 1.8 - 0.9, col(8 + 4 * j) * 1.8 - 0.9, 0.07 + 0.08 * col(9 + 4 * j)
        m = (xx - cx).square_().add_((yy - cy).square_()).sqrt_().sub_(rr).mul_(-sharp).sigmoid_()
        dot = _hsv_to_rgb(p[:, 10 + 4 * j], torch.full((n,), 0.6), torch.full((n,), 0.6)).view(n, 3, 1, 1)
        img.lerp_(dot.expand_as(img), m.unsqueeze(1))

    # The object: random place, size and rotation; stripes (kind 5) get a class orientation.
    cx, cy = col(15) * 0.8 - 0.4, col(16) * 0.8 - 0.4
    r = 0.38 + 0.27 * col(17)
    rot = p[:, 18] * 2 * math.pi
    stripe_angle = (variant.to(torch.float32) * 0.6 + 0.3) * math.pi / 2 + 0.15 * (p[:, 18] - 0.5)
    rot = torch.where(kind == 5, stripe_angle, rot)
    cos_t, sin_t = torch.cos(rot).view(n, 1, 1), torch.sin(rot).view(n, 1, 1)
    dx, dy = xx - cx, yy - cy
    u = (dx * cos_t).addcmul_(dy, sin_t)
    v = (dy * cos_t).addcmul_(dx, sin_t, value=-1.0)
    mask = torch.empty(n, s, s)
    shade = torch.ones(n, s, s)
    for k in range(NUM_KINDS):
        sel = (kind == k).nonzero().flatten()
        if sel.numel():
            mask[sel] = _shape_mask(k, u[sel], v[sel], r[sel], sharp)
    for t in range(1, NUM_TEXTURES):
        sel = (tex == t).nonzero().flatten()
        if sel.numel():
            shade[sel] = _texture(t, u[sel], v[sel], r[sel])
    # Value far from the background's so the object stays visible; hue random unless the class
    # has a hue band (only past 48 classes).
    hue = (band.to(torch.float32) + p[:, 19]) / num_bands
    fg_v = torch.remainder(bg_v + 0.35 + 0.3 * p[:, 20], 1.0).clamp(0.15, 1.0)
    fg = _hsv_to_rgb(hue, 0.45 + 0.55 * p[:, 21], fg_v).view(n, 3, 1, 1)
    fg = fg * shade.mul_(0.65).add_(0.35).unsqueeze(1)
    img.lerp_(fg, mask.unsqueeze(1))
    img.addcmul_(noise, 0.03 + 0.04 * col(22).unsqueeze(1))
    out = (img.clamp_(0, 1) * 255).round_().to(torch.uint8)
    return out, labels


# Layouts: three identical dots whose arrangement is the class (unit offsets, before the
# per-image scale, rotation jitter and position).
_LAYOUTS = (
    ((-1.0, 0.0), (0.0, 0.0), (1.0, 0.0)),  # horizontal line
    ((0.0, -1.0), (0.0, 0.0), (0.0, 1.0)),  # vertical line
    ((-0.71, -0.71), (0.0, 0.0), (0.71, 0.71)),  # diagonal
    ((-0.71, 0.71), (0.0, 0.0), (0.71, -0.71)),  # anti-diagonal
    ((0.0, -0.8), (-0.7, 0.4), (0.7, 0.4)),  # triangle, apex up
    ((0.0, 0.8), (-0.7, -0.4), (0.7, -0.4)),  # apex down
    ((-0.8, 0.0), (0.4, -0.7), (0.4, 0.7)),  # apex left
    ((0.8, 0.0), (-0.4, -0.7), (-0.4, 0.7)),  # apex right
)
_LAYOUT_TAG = 101  # keys the layouts' random numbers apart from the shapes'
_LAYOUT_PARAMS = 16


def _render_layouts(indices: torch.Tensor, num_classes: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 'layouts' kind: every image holds the same parts (three dots of one random colour on a
    random gradient), so a bag of its patches says almost nothing about the class; only where the
    dots sit relative to each other does. Classes past 8 rotate the 8 layouts by (c // 8) * 15 deg."""
    n, s = indices.numel(), size
    labels = torch.remainder(indices, num_classes).to(torch.int64)
    rnd = _keyed_uniforms(indices, _LAYOUT_PARAMS + 3 * s * s, seed, _LAYOUT_TAG)
    p = rnd[:, :_LAYOUT_PARAMS]
    noise = rnd[:, _LAYOUT_PARAMS:].view(n, 3, s, s).sub_(0.5).mul_(math.sqrt(12.0))
    yy, xx = _pixel_grid(s)
    sharp = s / 2.0

    def col(i: int) -> torch.Tensor:
        return p[:, i].view(n, 1, 1)

    bg_v, bg_a, bg_b, ramp = _gradient_background(p, xx, yy)
    img = bg_a + (bg_b - bg_a) * ramp.unsqueeze(1)

    offsets = torch.tensor(_LAYOUTS, dtype=torch.float32)[torch.remainder(labels, len(_LAYOUTS))]  # (n, 3, 2)
    rot = torch.div(labels, len(_LAYOUTS), rounding_mode="floor").to(torch.float32) * (math.pi / 12)
    rot = rot + 0.3 * (p[:, 7] - 0.5)
    spacing = 0.34 + 0.14 * p[:, 8]
    radius = 0.13 + 0.06 * p[:, 9]
    reach = (0.92 - spacing - radius).clamp(min=0.0)
    cx, cy = (p[:, 10] * 2 - 1) * reach, (p[:, 11] * 2 - 1) * reach
    cos_t, sin_t = torch.cos(rot), torch.sin(rot)
    ox = (offsets[..., 0] * cos_t[:, None] - offsets[..., 1] * sin_t[:, None]) * spacing[:, None] + cx[:, None]
    oy = (offsets[..., 0] * sin_t[:, None] + offsets[..., 1] * cos_t[:, None]) * spacing[:, None] + cy[:, None]
    fg_v = torch.remainder(bg_v + 0.35 + 0.3 * p[:, 12], 1.0).clamp(0.15, 1.0)
    fg = _hsv_to_rgb(p[:, 13], 0.45 + 0.55 * p[:, 14], fg_v).view(n, 3, 1, 1)
    mask = torch.zeros(n, s, s)
    for j in range(3):
        d = (xx - ox[:, j].view(n, 1, 1)).square_().add_((yy - oy[:, j].view(n, 1, 1)).square_()).sqrt_()
        mask = torch.maximum(mask, _soft(radius.view(n, 1, 1) - d, sharp))
    img.lerp_(fg.expand_as(img), mask.unsqueeze(1))
    img.addcmul_(noise, 0.03 + 0.04 * col(15).unsqueeze(1))
    return (img.clamp_(0, 1) * 255).round_().to(torch.uint8), labels


_GRATING_TAG = 102


def _render_gratings(indices: torch.Tensor, num_classes: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 'gratings' kind: a grating between two random colours whose orientation is the class
    (class c at c * 180 / C degrees, jittered by a quarter of the spacing), with random spatial
    frequency, phase and contrast, low-frequency clutter and pixel noise. The mean colour says
    nothing about the class; the local structure of every patch does."""
    n, s = indices.numel(), size
    labels = torch.remainder(indices, num_classes).to(torch.int64)
    rnd = _keyed_uniforms(indices, _LAYOUT_PARAMS + 3 * 4 * 4 + 3 * s * s, seed, _GRATING_TAG)
    p = rnd[:, :_LAYOUT_PARAMS]
    clutter = rnd[:, _LAYOUT_PARAMS:_LAYOUT_PARAMS + 48].view(n, 3, 4, 4)
    noise = rnd[:, _LAYOUT_PARAMS + 48:].view(n, 3, s, s).sub_(0.5).mul_(math.sqrt(12.0))
    yy, xx = _pixel_grid(s)
    step = math.pi / num_classes
    theta = labels.to(torch.float32) * step + 0.5 * step * (p[:, 0] - 0.5)
    freq = (3.0 + 3.0 * p[:, 1]) * math.pi  # 3 .. 6 cycles across the image: an edge in most patches
    phase = p[:, 2] * 2 * math.pi
    u = xx * torch.cos(theta).view(n, 1, 1) + yy * torch.sin(theta).view(n, 1, 1)
    wave = torch.sin(u * freq.view(n, 1, 1) + phase.view(n, 1, 1)).mul_(0.5).add_(0.5)
    v_a = 0.15 + 0.7 * p[:, 3]
    # Muted colours of one hue: colour varies from image to image (no class signal in it) without
    # being the dominant difference between images, which would swamp any distance on features.
    col_a = _hsv_to_rgb(p[:, 4], 0.3 * p[:, 5], v_a).view(n, 3, 1, 1)
    contrast = 0.25 + 0.35 * p[:, 6]
    v_b = torch.where(v_a > 0.5, v_a - contrast, v_a + contrast)
    col_b = _hsv_to_rgb(p[:, 4] + 0.1 * (p[:, 7] - 0.5), 0.3 * p[:, 8], v_b).view(n, 3, 1, 1)
    img = col_a + (col_b - col_a) * wave.unsqueeze(1)
    up = _upsample_matrix(4, s)
    img.add_(torch.matmul(torch.matmul(up, (clutter - 0.5) * 0.3), up.T))
    img.addcmul_(noise, 0.03 + 0.04 * p[:, 9].view(n, 1, 1, 1))
    return (img.clamp_(0, 1) * 255).round_().to(torch.uint8), labels


SYNTHETIC_KINDS = ("shapes", "layouts", "gratings")


def make_synthetic(
    num_images: int, num_classes: int, img_size: int, seed: int = DATASET_SEED, start: int = 0,
    kind: str = "shapes",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [start, start + num_images) of the set: uint8 (N, 3, S, S) and int64 labels (N,).

    Labels are index mod num_classes, so every split of at least num_classes images is balanced.
    `kind`: 'shapes' (the module docstring) or 'layouts' (`_render_layouts`).
    """
    if num_images < 0 or num_classes < 2 or img_size < 1:
        raise ValueError("make_synthetic needs num_images >= 0, num_classes >= 2, img_size >= 1")
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {', '.join(SYNTHETIC_KINDS)}")
    render = {"shapes": _render, "layouts": _render_layouts, "gratings": _render_gratings}[kind]
    idx = torch.arange(start, start + num_images, dtype=torch.int64)
    # Chunks of ~1 MB per plane stay in cache; on them intra-op threads do not pay off.
    chunk = max(1, (1 << 18) // (img_size * img_size))
    with single_thread():
        parts = [render(idx[i : i + chunk], num_classes, img_size, seed) for i in range(0, num_images, chunk)]
    if not parts:
        return torch.empty(0, 3, img_size, img_size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])


@lru_cache(maxsize=4)
def synthetic_split(
    split: str, num_images: int, num_classes: int, img_size: int, seed: int = DATASET_SEED,
    kind: str = "shapes",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 'train' split ([0, num_images)) or the disjoint 'val' split (the next
    `synthetic_val_size` indices). Cached: callers must not modify the returned tensors."""
    if split == "train":
        return make_synthetic(num_images, num_classes, img_size, seed, start=0, kind=kind)
    if split == "val":
        n_val = synthetic_val_size(num_images, num_classes)
        return make_synthetic(n_val, num_classes, img_size, seed, start=num_images, kind=kind)
    raise ValueError(f"unknown split {split!r}; choose 'train' or 'val'")
