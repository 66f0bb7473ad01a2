"""Patch masks for the masked methods (DiffMAE, MAE): MAE's per-sample random masking, keyed like every other draw, and the
fixed center block the inpainting figures use.

A mask is carried as index tensors, as in MAE: `ids_keep` (B, n_keep) are the visible patches,
`ids_masked` (B, N - n_keep) the hidden ones, `ids_restore` (B, N) undoes the shuffle (position
of patch n in the concatenation [visible, masked]), and `mask` (B, N) is True where hidden.
Every row hides the same number of patches, so visible and masked tokens stack into dense
tensors and the encoder runs on n_keep tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..seeding import TAG_MASK, derive_seed


@dataclass
class PatchMask:
    ids_keep: torch.Tensor
    """(B, n_keep) int64 indices of the visible patches."""
    ids_masked: torch.Tensor
    """(B, N - n_keep) int64 indices of the hidden patches."""
    ids_restore: torch.Tensor
    """(B, N) int64: patch n sits at position ids_restore[b, n] of cat([visible, masked])."""
    mask: torch.Tensor
    """(B, N) bool, True where the patch is hidden."""

    @property
    def num_keep(self) -> int:
        return self.ids_keep.shape[1]

    def to(self, device) -> PatchMask:
        return PatchMask(*(t.to(device) for t in (self.ids_keep, self.ids_masked, self.ids_restore, self.mask)))


def num_visible(num_patches: int, ratio: float) -> int:
    """Visible patches per sample at mask ratio `ratio` (MAE's rounding: int(N (1 - ratio))),
    at least one so the encoder always has a token to see."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio {ratio} must lie in [0, 1)")
    return max(1, int(num_patches * (1.0 - ratio)))


def from_scores(scores: torch.Tensor, num_keep: int) -> PatchMask:
    """Keep the `num_keep` lowest-scoring patches of each row (B, N); ties keep index order."""
    B, N = scores.shape
    ids_shuffle = torch.argsort(scores, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, N, dtype=torch.bool, device=scores.device)
    mask[:, :num_keep] = False
    mask = torch.gather(mask, 1, ids_restore)
    return PatchMask(ids_shuffle[:, :num_keep], ids_shuffle[:, num_keep:], ids_restore, mask)


def random_masking(batch: int, num_patches: int, ratio: float, *, seed: int, step: int, row: int = 0,
                   global_batch: int | None = None, device: torch.device | str = "cpu") -> PatchMask:
    """MAE's random masking of rows row .. row + batch - 1 of training step `step`'s global batch.

    The uniform scores of the whole global batch come from one generator keyed on
    (seed, TAG_MASK, step) and each caller takes its rows, so a micro-batch on a rank draws the
    masks that one process with the whole global batch draws for those rows.
    """
    gb = global_batch if global_batch is not None else row + batch
    if row < 0 or row + batch > gb:
        raise ValueError(f"rows {row}..{row + batch - 1} lie outside a global batch of {gb}")
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, TAG_MASK, step))
    scores = torch.rand(gb, num_patches, generator=gen, device=device)[row:row + batch]
    return from_scores(scores, num_visible(num_patches, ratio))


def center_block_mask(batch: int, grid_h: int, grid_w: int, fraction: float = 0.5,
                      device: torch.device | str = "cpu", frames: int = 1) -> PatchMask:
    """Hide the central block of `fraction` of each side (the supplement's center 128x128 of a
    256x256 image is fraction 0.5), the same block for every row; for clips the same block in
    each of `frames` time steps of a time-major patch order."""
    bh, bw = max(1, round(grid_h * fraction)), max(1, round(grid_w * fraction))
    top, left = (grid_h - bh) // 2, (grid_w - bw) // 2
    hidden = torch.zeros(grid_h, grid_w, dtype=torch.bool, device=device)
    hidden[top:top + bh, left:left + bw] = True
    hidden = hidden.flatten().repeat(frames)
    if bool(hidden.all()):
        raise ValueError(f"a center block of fraction {fraction} hides the whole {grid_h}x{grid_w} grid")
    scores = hidden.float().expand(batch, -1)
    return from_scores(scores, int((~hidden).sum()))


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of x (B, N, C) at ids (B, M) -> (B, M, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(base: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of base (B, N, C) with rows ids (B, M) replaced by values (B, M, C)."""
    return base.scatter(1, ids.unsqueeze(-1).expand(-1, -1, base.shape[-1]), values.to(base.dtype))


def encode_visible(encoder, x: torch.Tensor, ids_keep: torch.Tensor,
                   keep_blocks: tuple[int, ...] = ()) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """(B, C, H, W) images or (B, C, T, H, W) clips, (B, n_keep) visible patch ids ->
    (B, 1 + n_keep, width) after the encoder's final norm; the hidden patches never enter the blocks.
    keep_blocks: also return these blocks' outputs: a tuple with one entry per encoder block, the
    output of each block in keep_blocks (the last one after the final norm), None elsewhere."""
    B = x.shape[0]
    pos = encoder.pos_embed.to(x.dtype)
    tokens = gather_tokens(encoder.patch_embed(x) + pos[:, 1:], ids_keep)
    cls = (encoder.cls_token + pos[:, :1]).expand(B, -1, -1).to(tokens.dtype)
    tokens = torch.cat([cls, tokens], dim=1)
    outs: list[torch.Tensor | None] = []
    for i, blk in enumerate(encoder.blocks):
        tokens = blk(tokens, None)
        outs.append(tokens if i in keep_blocks else None)
    tokens = encoder.norm(tokens)
    if not keep_blocks:
        return tokens
    outs[-1] = tokens
    return tuple(outs)


# MAE's norm_pix_loss: each target patch normalised by its own mean and variance over D.
NORM_PIX_EPS = 1e-6


def normalize_patches(t: torch.Tensor) -> torch.Tensor:
    """Patches (B, N, D) with mean 0 and variance 1 over D each (MAE's norm_pix_loss target)."""
    mu, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
    return (t - mu) / (var + NORM_PIX_EPS).sqrt()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over hidden patches of the per-patch mean squared error; pred, target (B, N, D),
    mask (B, N) True where hidden (None: every patch counts)."""
    per_patch = (pred.float() - target.float()).square().mean(dim=-1)
    if mask is None:
        return per_patch.mean()
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)
