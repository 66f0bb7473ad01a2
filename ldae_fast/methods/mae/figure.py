"""MAE's figure: original / masked / reconstruction, for a random and a centre-block mask."""

from __future__ import annotations

from pathlib import Path

import torch

from ..grid import save_grid
from ..sampling import device_of


def method_figure(cfg, model, method, out_dir, *, images=None, step: int = 0) -> tuple[Path, str]:
    """MethodSpec.figure: reconstruction.png, one row per image and mask kind."""
    if images is None:
        from ...data import build_eval_arrays
        images, _ = build_eval_arrays(cfg, "val", max_images=4, labels=False)
    images = images[:4]
    method = method.to(device_of(model))
    cols = [[], [], []]
    for kind in ("random", "center"):
        (masked, recon), = method.sample(model, images, step=step, mask=kind)
        for c, t in zip(cols, (images.float(), masked, recon)):
            c.append(t.cpu())
    path = save_grid([torch.cat(c) for c in cols], ["original", "masked", "reconstruction"],
                     Path(out_dir) / "reconstruction.png")
    return path, (f"original / masked / reconstruction; {cfg.mae.mask_ratio:.0%} random masks "
                  f"(first rows), centre block (last rows)")
