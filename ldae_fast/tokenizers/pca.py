"""Patch-wise PCA tokenizer: fitted on a stream of images, saved and loaded as safetensors.

The basis V (D, D) has orthonormal rows sorted by decreasing eigenvalue of the patch covariance;
the latent of a patch is (patch - mu) V_d^T with V_d = V[:d]. Linear, so `linear_maps()` hands
(V_d, V_d^T) to the fused noise kernel; the PCA-space loss also reads the full V.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import reference

FORMAT_VERSION = 1


class TokenizerMismatch(ValueError):
    """A saved basis does not fit the configuration it is loaded for."""


class CovarianceAccumulator:
    """Running float64 sums of patches and their outer products.

    float64 because a covariance of millions of patches accumulated in float32 loses the small
    eigenvalues that decide the ordering of the trailing components.
    """

    def __init__(self, patch_size: int, channels: int = 3):
        self.p = patch_size
        self.D = channels * patch_size**2
        self.n = 0
        self.s1 = torch.zeros(self.D, dtype=torch.float64)
        self.s2 = torch.zeros(self.D, self.D, dtype=torch.float64)

    def update(self, images: torch.Tensor) -> None:
        tok = reference.patchify(images, self.p).reshape(-1, self.D).to("cpu", torch.float64)
        self.n += tok.shape[0]
        self.s1 += tok.sum(0)
        self.s2 += tok.t() @ tok

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (basis (D, D) rows = eigenvectors by decreasing eigenvalue, mean (D,), eigenvalues (D,))."""
        if self.n < 2:
            raise ValueError("PCA needs at least two patches; the image stream was empty")
        mean = self.s1 / self.n
        cov = (self.s2 - self.n * torch.outer(mean, mean)) / (self.n - 1)
        cov = 0.5 * (cov + cov.t())
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)
        evals = evals[order].clamp_min(0.0)
        basis = evecs[:, order].t().contiguous()
        # eigh's signs are arbitrary; fix them so two fits of the same data give the same basis.
        idx = basis.abs().argmax(dim=1)
        signs = torch.sign(basis[torch.arange(self.D), idx])
        basis = basis * signs[:, None]
        return basis, mean, evals


@dataclass
class PCATokenizer:
    basis_full: torch.Tensor
    """(D, D) float32, orthonormal rows sorted by decreasing eigenvalue."""
    mean: torch.Tensor
    """(D,) float32 mean patch."""
    eigenvalues: torch.Tensor
    """(D,) float32 patch-covariance eigenvalues, decreasing."""
    patch_size: int
    d: int
    kind: str = "pca"
    channels: int = 3
    num_patches_fitted: int = 0

    @property
    def D(self) -> int:
        return self.basis_full.shape[0]

    @property
    def basis(self) -> torch.Tensor:
        """V_d, (d, D)."""
        return self.basis_full[: self.d]

    def explained_variance(self) -> torch.Tensor:
        """Cumulative fraction of patch variance captured by the first k components, k = 1..D."""
        total = self.eigenvalues.sum().clamp_min(1e-30)
        return self.eigenvalues.cumsum(0) / total

    def to(self, device) -> PCATokenizer:
        return type(self)(self.basis_full.to(device), self.mean.to(device), self.eigenvalues.to(device),
                            self.patch_size, self.d, self.kind, self.channels, self.num_patches_fitted)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> latents (B, N, d)."""
        return (reference.patchify(images.float(), self.patch_size) - self.mean) @ self.basis.t()

    def decode(self, z: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """latents (B, N, d) -> images, the inverse PCA (exact only on span(V_d))."""
        return reference.unpatchify(z @ self.basis + self.mean, self.patch_size, H, W, self.channels)

    def linear_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder (d, D), decoder (D, d)): latent = (patch - mean) E^T, patch = latent G^T + mean."""
        return self.basis, self.basis.t()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        other = type(self).from_state(tensors, meta)
        self.__dict__.update(other.__dict__)

    def metadata(self) -> dict:
        ev = self.explained_variance()
        return {
            "format_version": FORMAT_VERSION, "kind": self.kind, "patch_size": self.patch_size,
            "channels": self.channels, "latent_dim": self.d, "patch_dim": self.D,
            "num_patches_fitted": self.num_patches_fitted,
            "explained_variance_at_d": float(ev[self.d - 1]),
            "eigenvalues": [float(e) for e in self.eigenvalues],
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"basis": self.basis_full.float().cpu().contiguous(), "mean": self.mean.float().cpu().contiguous(),
                "eigenvalues": self.eigenvalues.float().cpu().contiguous()}

    def save(self, path: str | Path) -> Path:
        """Write `path` (.safetensors, metadata in its header) and a human-readable `path`.json."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.state_dict(), str(tmp), metadata={"ldae_tokenizer": json.dumps(meta)})
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> PCATokenizer:
        """Checked against what the kind promises: shapes from the metadata, finite values, an
        orthonormal basis (TokenizerFileError otherwise)."""
        from ._io import TokenizerFileError, check_tensors

        kind = meta.get("kind", "pca")
        p, d, C = int(meta["patch_size"]), int(meta["latent_dim"]), int(meta.get("channels", 3))
        D = C * p * p
        if not 1 <= d <= D:
            raise TokenizerFileError(f"{kind} tokenizer: latent_dim={d} must be in 1..{D} (patch {p}, {C} channels)")
        check_tensors(kind, tensors, {"basis": (D, D), "mean": (D,), "eigenvalues": (D,)}, orthonormal=("basis",),
                      why=f"patch {p}, {C} channels in its metadata")
        return cls(tensors["basis"].float(), tensors["mean"].float(), tensors["eigenvalues"].float(),
                   int(meta["patch_size"]), int(meta["latent_dim"]), meta.get("kind", "pca"),
                   int(meta.get("channels", 3)), int(meta.get("num_patches_fitted", 0)))

    @classmethod
    def load(cls, path: str | Path, patch_size: int | None = None, latent_dim: int | None = None,
             kind: str | None = None) -> PCATokenizer:
        """Load a saved basis; refuse one whose patch size, latent dim or kind differs from the
        values given (those of the run's config)."""
        from ._io import read_tokenizer_file

        try:
            tensors, meta = read_tokenizer_file(path, "ldae-fast fit-pca")
        except ValueError as e:
            raise TokenizerMismatch(str(e)) from None
        checks = [("patch_size", "model.patch_size", patch_size), ("latent_dim", "tokenizer.latent_dim", latent_dim),
                  ("kind", "tokenizer.kind", kind)]
        for key, cfg_name, want in checks:
            if want is not None and meta.get(key) != want:
                raise TokenizerMismatch(
                    f"tokenizer {path} has {key}={meta.get(key)!r} but the config asks for "
                    f"{cfg_name}={want!r}; pass --{cfg_name}={meta.get(key)} or refit with `ldae-fast fit-pca`")
        return cls.from_state(tensors, meta)


def prepare(cfg, images: Callable[[], Iterable[torch.Tensor]], log: Callable[[str], None]) -> PCATokenizer:
    """The run's basis: loaded from tokenizer.path (checked against the config), else fitted on
    tokenizer.fit_images images of `images()`."""
    t = cfg.tokenizer
    if t.path:
        return _load_user_basis(t.path, cfg.model.patch_size, t.latent_dim)
    t0 = time.time()
    tok = fit_pca(images(), cfg.model.patch_size, t.latent_dim, t.fit_images)
    ev = float(tok.explained_variance()[t.latent_dim - 1])
    log(f"fitted patch PCA on {t.fit_images} images ({tok.num_patches_fitted} patches, D={tok.D}) in "
        f"{time.time() - t0:.1f}s; the first d={t.latent_dim} components explain {100 * ev:.1f}% of the variance")
    return tok


def _load_user_basis(path: str, patch_size: int, latent_dim: int) -> PCATokenizer:
    """tokenizer.path, with a file that is not a tokenizer reported as the user's file."""
    from ..config import ConfigError
    from ..errors import FileProblem, UserError
    from ._io import TokenizerFileError

    try:
        return PCATokenizer.load(path, patch_size=patch_size, latent_dim=latent_dim, kind="pca")
    except (FileNotFoundError, UserError):
        raise
    except TokenizerMismatch as e:  # a basis for another patch size / latent dim: its message says which
        raise ConfigError(f"tokenizer.path: {e}") from e
    except TokenizerFileError as e:
        raise FileProblem(f"tokenizer.path={path}: {e}") from e
    except Exception as e:  # whatever safetensors or the basis check raise on a foreign file
        raise FileProblem(f"tokenizer.path={path}: not a readable tokenizer .safetensors "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def fit_pca(images: Iterable[torch.Tensor], patch_size: int, latent_dim: int, max_images: int,
            progress=None) -> PCATokenizer:
    """Fit on batches (B, C, H, W) of normalised images until `max_images` have been seen."""
    acc: CovarianceAccumulator | None = None
    seen = 0
    channels = 3
    for batch in images:
        if acc is None:
            channels = batch.shape[1]
            acc = CovarianceAccumulator(patch_size, channels)
        batch = batch[: max_images - seen]
        acc.update(batch)
        seen += batch.shape[0]
        if progress is not None:
            progress(seen, max_images)
        if seen >= max_images:
            break
    if acc is None:
        raise ValueError("PCA fit got no images")
    basis, mean, evals = acc.finish()
    D = basis.shape[0]
    if not 1 <= latent_dim <= D:
        raise ValueError(f"latent_dim={latent_dim} must be in 1..{D} for patch size {patch_size}")
    return PCATokenizer(basis.float(), mean.float(), evals.float(), patch_size, latent_dim, "pca", channels, acc.n)
