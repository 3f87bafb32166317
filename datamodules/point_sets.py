"""The samples flow matching learns to generate, and the sources it starts from.

* 2-D toys, generated from a seed: ``moons`` (two interleaved half circles) and ``checkerboard``
  (uniform on the 8 dark squares of a 4x4 board over [-2, 2]^2); both have spread near 1 per axis,
  like the standard normal source;
* scikit-learn's digits (1,797 images of 8x8 pixels, shipped inside the package), scaled to [-1, 1];
* MNIST in its IDX format (``train-images-idx3-ubyte`` with the optional ``t10k-`` test file and
  ``-labels-idx1-ubyte`` files, plain or ``.gz``), scaled to [-1, 1];
* a user's ``.npy``/``.npz``/``.pt`` array ``[N, D]`` (vectors) or ``[N, H, W]`` / ``[N, C, H, W]``
  (images), taken as given.

Sources: ``gaussian`` (standard normal of the sample shape) and, for 2-D data, ``8gaussians``
(eight Gaussians of std 0.2 on a circle of radius 2), the classic "8 gaussians to moons" pair.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch

from clustering.features import nonfinite_rows
from datamodules.arrays import load_array

IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801


def moons(num: int, seed: int, noise: float = 0.1) -> torch.Tensor:
    """Two moons (scikit-learn's ``make_moons``), centred and scaled by 2: about [-3, 3] x [-1.5, 1.5]."""
    from sklearn.datasets import make_moons

    points, _ = make_moons(num, noise=noise, random_state=seed)
    return torch.from_numpy((points - [0.5, 0.25]) * 2).float()


def checkerboard(num: int, seed: int) -> torch.Tensor:
    """Uniform on the squares ``(i + j)`` even of a 4x4 board of unit squares over [-2, 2]^2."""
    rng = np.random.default_rng(seed)
    cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0])
    corner = cells[rng.integers(len(cells), size=num)] - 2.0
    return torch.from_numpy(corner + rng.random((num, 2))).float()


def eight_gaussians(num: int, generator: torch.Generator, radius: float = 2.0, std: float = 0.2) -> torch.Tensor:
    angles = torch.randint(8, (num,), generator=generator) * (2 * math.pi / 8)
    centers = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return centers + std * torch.randn(num, 2, generator=generator)


def source_samples(source: str, num: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``num`` draws ``[num, *shape]`` of the source distribution ``x0``."""
    if source == "gaussian":
        return torch.randn(num, *shape, generator=generator)
    if source == "8gaussians":
        if shape != (2,):
            raise ValueError(f"source '8gaussians' is 2-D; the data has samples of shape {shape}")
        return eight_gaussians(num, generator)
    raise ValueError(f"source must be 'gaussian' or '8gaussians', got {source!r}")


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as images ``[1797, 1, 8, 8]`` in [-1, 1] (pixels 0..16) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images).float().unsqueeze(1) / 8 - 1
    return images, torch.from_numpy(data.target).long()


# ---- MNIST IDX --------------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (unsigned bytes; ``.gz`` read transparently), as a uint8 array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such IDX file")
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic number {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    start = 4 + 4 * ndim
    if len(raw) - start != math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape} ({math.prod(shape)} bytes) but holds {len(raw) - start}")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz", stem.replace("-idx", ".idx"), f"{stem.replace('-idx', '.idx')}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def mnist(folder: str | Path, split: str) -> dict[str, torch.Tensor]:
    """MNIST-format images ``[N, 1, 28, 28]`` in [-1, 1] and labels, ``split`` ``"train"`` or ``"t10k"``.

    Returns ``{}`` for a missing ``t10k`` split; a missing train file is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected MNIST IDX files in it)")
    images_file = _idx_file(folder, f"{split}-images-idx3-ubyte")
    if images_file is None:
        if split == "train":
            raise FileNotFoundError(f"{folder}: holds no train-images-idx3-ubyte[.gz]")
        return {}
    images = read_idx(images_file)
    if images.ndim != 3:
        raise ValueError(f"{images_file}: expected images [N, H, W], got shape {images.shape}")
    split_data = {"x": torch.from_numpy(images.copy()).float().unsqueeze(1) / 127.5 - 1}
    labels_file = _idx_file(folder, f"{split}-labels-idx1-ubyte")
    if labels_file is not None:
        labels = read_idx(labels_file)
        if labels.shape != (len(images),):
            raise ValueError(f"{labels_file}: {labels.shape} labels for {len(images)} images in {images_file}")
        split_data["y"] = torch.from_numpy(labels.astype(np.int64))
    return split_data


def user_array(path: str | Path, key: str | None = None) -> torch.Tensor:
    """Samples ``[N, D]``, ``[N, H, W]`` (one channel added) or ``[N, C, H, W]`` from an array file."""
    array = load_array(path, key)
    if array.dim() not in (2, 3, 4) or not array.is_floating_point() and array.dtype != torch.uint8:
        raise ValueError(f"{path}: expected numeric samples [N, D], [N, H, W] or [N, C, H, W], "
                         f"got shape {tuple(array.shape)} and dtype {array.dtype}")
    array = array.float()
    bad = nonfinite_rows(array)
    if len(bad):
        raise ValueError(f"{path}: {len(bad)} samples hold NaN or inf (first: {bad[0].item()})")
    return array.unsqueeze(1) if array.dim() == 3 else array
