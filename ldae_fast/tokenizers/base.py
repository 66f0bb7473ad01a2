"""What a method needs from a tokenizer, whatever it is (PCA, pixels, a patch AE or VAE)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Tokenizer(Protocol):
    kind: str
    patch_size: int
    d: int
    """Latent dimension per patch."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> latents (B, N, d)."""

    def decode(self, z: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """latents (B, N, d) -> (B, C, H, W) images."""

    def linear_maps(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(encoder (d, D), decoder (D, d)) when the tokenizer is an affine map of the patch (then
        the fused noise kernel applies, with the tokenizer's `mean` (D,) patch as the offset);
        None for a nonlinear one."""

    def to(self, device) -> Tokenizer:
        ...

    def save(self, path) -> None:
        """A standalone file (safetensors, metadata in its header) that `load` refuses to misuse."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (saved with safetensors or weights_only torch.load)."""

    def metadata(self) -> dict:
        """JSON-able facts: format_version, kind, patch_size, latent_dim, ..."""

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        ...
