"""Two-patch data of the feature-learning study: the synthetic model and Noisy-MNIST.

Every sample is x = [x1, x2] with x1 the signal patch and x2 a Gaussian noise patch. Data sets are
returned as a `TwoPatchData` whose `x` has shape (n, 2, d), so the networks can treat "signal" and
"noise" patches with one shared weight matrix and the metrics can read either patch back.
"""

from __future__ import annotations

import gzip
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"


@dataclass
class TwoPatchData:
    x: torch.Tensor  # (n, 2, d): x[:, 0] signal patch, x[:, 1] noise patch
    y: torch.Tensor  # (n,) labels in {-1, +1}, same dtype as x so losses need no casts
    snr: float  # |mu| / (sigma_xi sqrt(d)); for MNIST |mu| is the RMS norm of the signal patches

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def d(self) -> int:
        return self.x.shape[2]

    @property
    def n_snr2(self) -> float:
        return self.n * self.snr**2

    def to(self, device: str | torch.device) -> TwoPatchData:
        return TwoPatchData(self.x.to(device), self.y.to(device), self.snr)


def snr(mu_norm: float, sigma_xi: float, d: int) -> float:
    return mu_norm / (sigma_xi * math.sqrt(d))


def signal_vectors(d: int, mu_norm: float, dtype=torch.float64) -> torch.Tensor:
    """(2, d): row 0 is mu_{+1} = |mu| e_1, row 1 is mu_{-1} = |mu| e_2 (orthogonal, equal norm)."""
    if d < 2:
        raise ValueError(f"d={d}: the two orthogonal signals need d >= 2")
    mu = torch.zeros(2, d, dtype=dtype)
    mu[0, 0] = mu_norm
    mu[1, 1] = mu_norm
    return mu


def synthetic(
    n: int,
    d: int,
    mu_norm: float,
    sigma_xi: float = 1.0,
    generator: torch.Generator | None = None,
    dtype=torch.float64,
) -> TwoPatchData:
    """n samples of the paper's data model: y = +-1 uniformly, x1 = mu_y, x2 ~ N(0, sigma_xi^2 I_d)."""
    if n < 1 or d < 2:
        raise ValueError(f"need n >= 1 and d >= 2, got n={n}, d={d}")
    if mu_norm <= 0 or sigma_xi <= 0:
        raise ValueError(f"need |mu| > 0 and sigma_xi > 0, got {mu_norm}, {sigma_xi}")
    mu = signal_vectors(d, mu_norm, dtype)
    y = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    x = torch.empty(n, 2, d, dtype=dtype)
    x[:, 0] = mu[(y == -1).long()]
    x[:, 1] = torch.randn(n, d, generator=generator, dtype=dtype) * sigma_xi
    return TwoPatchData(x, y.to(dtype), snr(mu_norm, sigma_xi, d))


# --- Noisy-MNIST ---------------------------------------------------------------------------------


def default_mnist_dirs() -> list[Path]:
    """Where the IDX files are looked for: ../shared/data/mnist beside the repo root, then the cwd's."""
    repo_root = Path(__file__).resolve().parents[2]
    dirs = [repo_root.parent / "shared" / "data" / "mnist", Path.cwd().parent / "shared" / "data" / "mnist"]
    seen: list[Path] = []
    for p in dirs:
        if p.resolve() not in [s.resolve() for s in seen]:
            seen.append(p)
    return seen


def find_mnist(data_dir: str | Path | None = None) -> Path:
    candidates = [Path(data_dir)] if data_dir is not None else default_mnist_dirs()
    for c in candidates:
        if (c / MNIST_IMAGES).is_file() and (c / MNIST_LABELS).is_file():
            return c
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise FileNotFoundError(
        f"MNIST IDX files {MNIST_IMAGES} and {MNIST_LABELS} not found; looked in: {looked}. "
        "Pass the folder that holds them with --data DIR (the 10,000-image MNIST test split)."
    )


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short to be an IDX file")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise ValueError(f"{path}: IDX magic {magic:#x}, expected {expected_magic:#x}")
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes of data")
    return data.reshape(dims)


def load_mnist(data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) from the gzipped IDX files."""
    d = find_mnist(data_dir)
    images = _read_idx(d / MNIST_IMAGES, 0x803)
    labels = _read_idx(d / MNIST_LABELS, 0x801)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{d}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


@dataclass
class NoisyMnistSplit:
    train: TwoPatchData
    test: TwoPatchData
    scale: float  # multiplier applied to the [0, 1] pixel values of the signal patch


def noisy_mnist(
    n_snr2: float,
    n_per_class: int = 50,
    n_test_per_class: int = 500,
    digits: tuple[int, int] = (0, 1),
    data_dir: str | Path | None = None,
    sigma_xi: float = 1.0,
    generator: torch.Generator | None = None,
    dtype=torch.float64,
    mnist: tuple[np.ndarray, np.ndarray] | None = None,
) -> NoisyMnistSplit:
    """Noisy-MNIST: signal patch = scaled image, noise patch = N(0, sigma_xi^2 I_784).

    Digit digits[0] is y = +1, digits[1] is y = -1. Train and test images are disjoint draws from
    the same file. The pixel scale is chosen so that the training set has the requested n SNR^2,
    with |mu| taken as the RMS norm of the training signal patches; test uses the same scale.
    """
    if n_snr2 <= 0:
        raise ValueError(f"n SNR^2 must be positive, got {n_snr2}")
    images, labels = mnist if mnist is not None else load_mnist(data_dir)
    d = images.shape[1] * images.shape[2]
    xs, ys_, xt, yt = [], [], [], []
    for label, digit in zip((1.0, -1.0), digits):
        idx = np.flatnonzero(labels == digit)
        need = n_per_class + n_test_per_class
        if idx.size < need:
            raise ValueError(
                f"digit {digit}: {idx.size} images, need {need} ({n_per_class} train + "
                f"{n_test_per_class} test); lower --n-test-per-class"
            )
        perm = torch.randperm(idx.size, generator=generator).numpy()
        chosen = idx[perm[:need]]
        imgs = torch.from_numpy(images[chosen].reshape(need, d).astype(np.float64) / 255.0).to(dtype)
        xs.append(imgs[:n_per_class])
        xt.append(imgs[n_per_class:])
        ys_.append(torch.full((n_per_class,), label, dtype=dtype))
        yt.append(torch.full((n_test_per_class,), label, dtype=dtype))
    sig_train, sig_test = torch.cat(xs), torch.cat(xt)
    n = sig_train.shape[0]
    rms_norm = sig_train.norm(dim=1).pow(2).mean().sqrt().item()
    # n SNR^2 = n (scale * rms / (sigma sqrt d))^2  =>  solve for scale.
    scale = math.sqrt(n_snr2 / n) * sigma_xi * math.sqrt(d) / rms_norm

    def build(sig: torch.Tensor, y: torch.Tensor) -> TwoPatchData:
        x = torch.empty(sig.shape[0], 2, d, dtype=dtype)
        x[:, 0] = sig * scale
        x[:, 1] = torch.randn(sig.shape[0], d, generator=generator, dtype=dtype) * sigma_xi
        return TwoPatchData(x, y, snr(scale * rms_norm, sigma_xi, d))

    return NoisyMnistSplit(build(sig_train, torch.cat(ys_)), build(sig_test, torch.cat(yt)), scale)
