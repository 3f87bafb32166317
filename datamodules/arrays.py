"""Reading and writing embedding arrays: ``.npy``, ``.npz``, ``.pt`` and the official TEMI folder.

The TEMI folder layout (``gen_embeds.py`` of the official code) is::

    embeddings.pt  label.pt  knn.pt          # train split: [N, D] float, [N] int, [N, k] int
    embeddings-test.pt  label-test.pt        # optional test split

Every error names the file at fault.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clustering.features import nonfinite_rows

SUFFIXES = (".npy", ".npz", ".pt", ".pth")


def load_array(path: str | Path, key: str | None = None) -> torch.Tensor:
    """Load one array from ``path``; ``key`` picks an entry of an ``.npz`` or a dict ``.pt``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return torch.from_numpy(_pick(dict(archive), key, path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: could not be read ({error})") from error
    if isinstance(loaded, dict):
        loaded = _pick(loaded, key, path)
    if isinstance(loaded, np.ndarray):
        loaded = torch.from_numpy(loaded)
    if not isinstance(loaded, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor, found {type(loaded).__name__}")
    return loaded


def _pick(entries: dict, key: str | None, path: Path):
    if key is not None and key in entries:
        return entries[key]
    if len(entries) == 1:
        return next(iter(entries.values()))
    raise KeyError(f"{path}: has no entry {key!r} (found {sorted(entries)}); say which one with a key")


def archive_keys(path: str | Path) -> set[str]:
    """Entry names of an ``.npz`` or dict ``.pt`` file; empty for a plain array file."""
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as archive:
            return set(archive.files)
    if path.suffix in (".pt", ".pth") and path.is_file():
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        return set(loaded) if isinstance(loaded, dict) else set()
    return set()


def as_embeddings(array: torch.Tensor, source: str | Path) -> torch.Tensor:
    """Validate an ``[N, D]`` floating array; NaN or inf rows are refused."""
    if array.dim() != 2:
        raise ValueError(f"{source}: embeddings must have shape [N, D], got {tuple(array.shape)}")
    if not (array.is_floating_point() or array.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{source}: embeddings must be numeric, got dtype {array.dtype}")
    array = array.float()
    bad = nonfinite_rows(array)
    if len(bad):
        raise ValueError(f"{source}: {len(bad)} rows hold NaN or inf (first rows: {bad[:5].tolist()})")
    return array


def as_labels(array: torch.Tensor, num_rows: int, source: str | Path, embeddings_shape: tuple) -> torch.Tensor:
    """Validate integer labels ``[N]`` that match ``num_rows`` embeddings."""
    array = array.squeeze(-1) if array.dim() == 2 and array.shape[1] == 1 else array
    if array.dim() != 1 or len(array) != num_rows:
        raise ValueError(
            f"{source}: labels of shape {tuple(array.shape)} do not match embeddings of shape "
            f"{tuple(embeddings_shape)} (need [{num_rows}])"
        )
    if array.is_floating_point():
        if not torch.equal(array, array.round()):
            raise ValueError(f"{source}: labels must be integers, got non-integer {array.dtype} values")
    elif array.dtype == torch.bool:
        raise ValueError(f"{source}: labels must be integers, got dtype {array.dtype}")
    return array.long()


def as_neighbors(array: torch.Tensor, num_rows: int, source: str | Path) -> torch.Tensor:
    """Validate a neighbour table ``[N, k]`` of row indices."""
    if array.dim() != 2 or len(array) != num_rows or array.is_floating_point():
        raise ValueError(
            f"{source}: neighbour table must be integer [N={num_rows}, k], got {tuple(array.shape)} {array.dtype}"
        )
    array = array.long()
    if array.numel() and (array.min() < 0 or array.max() >= num_rows):
        raise ValueError(f"{source}: neighbour indices must lie in [0, {num_rows})")
    return array


def temi_folder_paths(folder: str | Path, split: str = "") -> dict[str, Path]:
    """Paths of the official layout; ``split`` is ``""`` (train) or ``"-test"``."""
    folder = Path(folder)
    return {name: folder / f"{name}{split}.pt" for name in ("embeddings", "label", "knn")}


def save_temi_folder(
    folder: str | Path,
    embeddings: torch.Tensor,
    labels: torch.Tensor | None = None,
    neighbors: torch.Tensor | None = None,
    split: str = "",
) -> dict[str, Path]:
    """Write embeddings (and labels, kNN table) in the official TEMI layout."""
    paths = temi_folder_paths(folder, split)
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(embeddings.cpu(), paths["embeddings"])
    if labels is not None:
        torch.save(labels.cpu(), paths["label"])
    if neighbors is not None:
        torch.save(neighbors.cpu(), paths["knn"])
    return paths
