"""k-means with faiss, and the ``assignments.csv`` file that records which cluster each sample is in.

``kmeans`` clusters ``[N, D]`` features with ``faiss.Kmeans`` (on the GPU when faiss and torch
both have one) and assigns every point to its nearest centroid (``nearest_centroids``). Clusters
left with no points in that final assignment are dropped and the rest renumbered ``0..K'-1`` in
order (see ``drop_empty_clusters``), so every cluster id that appears in a result has members.

faiss trains on at most ``max_points_per_centroid * K`` points, drawn by its own seeded
permutation; ``kmeans_sample`` names those points, so a caller that holds the features spread
over several processes can gather just them and get the centroids k-means on all points gives.

``assignments.csv`` holds one row per training sample::

    index,cluster
    0,3
    1,0
    ...

``read_assignments`` returns the cluster of sample ``i`` at position ``i`` and refuses a file
that does not cover the samples ``0..N-1`` exactly once; every error names the file and line.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clustering.features import nonfinite_rows

try:
    import faiss
except ImportError:  # pragma: no cover - faiss is a declared dependency
    faiss = None

ASSIGNMENTS_FILE = "assignments.csv"
ASSIGNMENTS_HEADER = ["index", "cluster"]
MAX_POINTS_PER_CENTROID = 256  # faiss's ClusteringParameters default


@dataclass
class KMeansResult:
    """Centroids ``[K, D]`` float32, cluster of each point ``[N]`` int64, the inertia
    (sum of squared distances to the assigned centroid) and how many empty clusters were dropped."""

    centroids: torch.Tensor
    assignments: torch.Tensor
    inertia: float
    dropped_empty: int = 0

    @property
    def num_clusters(self) -> int:
        return len(self.centroids)


def check_num_clusters(num_clusters: int, num_points: int, what: str = "points") -> None:
    """Raise ValueError unless ``1 <= num_clusters <= num_points``."""
    if num_clusters < 1:
        raise ValueError(f"k-means needs at least 1 cluster, got {num_clusters} (for {num_points} {what})")
    if num_clusters > num_points:
        raise ValueError(
            f"k-means cannot make {num_clusters} clusters from only {num_points} {what}; "
            f"lower the cluster count to at most {num_points}"
        )


def _check_features(features: torch.Tensor) -> torch.Tensor:
    if features.dim() != 2 or features.shape[1] == 0:
        raise ValueError(f"k-means features must have shape [N, D] with D >= 1, got {tuple(features.shape)}")
    features = features.detach().float().cpu()
    bad_rows = nonfinite_rows(features)
    if len(bad_rows):
        raise ValueError(
            f"k-means features: {len(bad_rows)} of {len(features)} rows hold NaN or inf "
            f"(first rows: {bad_rows[:5].tolist()})"
        )
    return features


def _use_gpu(gpu: bool | str) -> bool:
    has_faiss_gpu = hasattr(faiss, "StandardGpuResources")
    if gpu == "auto":
        return has_faiss_gpu and torch.cuda.is_available()
    if gpu is True and not has_faiss_gpu:
        raise RuntimeError(
            "k-means on the GPU needs faiss with GPU support (faiss-gpu); pass gpu=False or 'auto'"
        )
    if gpu not in (True, False):
        raise ValueError(f"gpu must be True, False or 'auto', got {gpu!r}")
    return gpu


def drop_empty_clusters(
    centroids: torch.Tensor, assignments: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Remove centroids no point is assigned to and renumber the rest ``0..K'-1``, keeping their order.

    Returns ``(centroids [K', D], assignments [N], number dropped)``. A dropped centroid was
    nobody's nearest, so every point's nearest remaining centroid is the one it already had.
    """
    counts = torch.bincount(assignments, minlength=len(centroids))
    kept = counts > 0
    new_ids = torch.cumsum(kept.long(), dim=0) - 1
    return centroids[kept], new_ids[assignments], int((~kept).sum())


def kmeans_sample(num_items: int, num_clusters: int, max_points_per_centroid: int = MAX_POINTS_PER_CENTROID,
                  seed: int = 0) -> torch.Tensor:
    """Indices of the points faiss k-means trains on, in the order it sees them.

    All points in order when ``num_items <= max_points_per_centroid * num_clusters``, else the first
    that many of faiss's permutation seeded with ``seed`` (faiss ``Clustering::train`` subsamples so):
    ``kmeans(features[sample], ...)`` then gives the centroids of ``kmeans(features, ...)``, and the
    sample depends on the number of items and the seed alone.
    """
    if max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid must be >= 1, got {max_points_per_centroid}")
    cap = max_points_per_centroid * num_clusters
    if num_items <= cap:
        return torch.arange(num_items)
    permutation = np.empty(num_items, dtype=np.int32)  # faiss's rand_perm fills C ints
    faiss.rand_perm(faiss.swig_ptr(permutation), num_items, seed)
    return torch.from_numpy(permutation[:cap].astype(np.int64))


def nearest_centroids(features: torch.Tensor, centroids: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """Position ``[N]`` int64 of each row's nearest centroid (squared Euclidean distance).

    Distances are computed in float64, a chunk of rows at a time (at most ``max_elements`` distances
    held), on the features' device. Their rounding lies far below float32 resolution, so shards of
    a dataset assigned on different processes agree with the whole assigned at once (faiss's float32
    search can flip near-ties with the batch it runs in).
    """
    if features.dim() != 2 or centroids.dim() != 2 or features.shape[1] != centroids.shape[1]:
        raise ValueError(f"nearest centroids need features [N, D] and centroids [K, D], got "
                         f"{tuple(features.shape)} and {tuple(centroids.shape)}")
    centroids = centroids.to(features.device, torch.float64)
    centroid_norms = (centroids * centroids).sum(1)
    chunk = max(1, max_elements // max(1, len(centroids)))
    nearest = []
    for rows in features.split(chunk):
        rows = rows.double()
        distances = centroid_norms - 2 * rows @ centroids.T  # ||x||^2 is the same for every centroid
        nearest.append(distances.argmin(dim=1))
    return torch.cat(nearest) if nearest else torch.zeros(0, dtype=torch.long, device=features.device)


def kmeans(
    features: torch.Tensor,
    num_clusters: int,
    seed: int = 0,
    niter: int = 25,
    nredo: int = 1,
    gpu: bool | str = "auto",
    max_points_per_centroid: int = MAX_POINTS_PER_CENTROID,
) -> KMeansResult:
    """Cluster ``features [N, D]`` into at most ``num_clusters`` groups with ``faiss.Kmeans``.

    Each point is assigned to its nearest centroid. Clusters that end up empty (duplicate
    points can cause this) are dropped with a warning and the rest renumbered, so the result
    may hold fewer than ``num_clusters`` centroids; ``dropped_empty`` says how many went.
    On the CPU the result is the same for the same ``seed``. Beyond ``max_points_per_centroid``
    points per cluster faiss trains on the subset ``kmeans_sample`` names; all points are assigned.
    gpu: ``True``, ``False`` or ``"auto"`` (GPU when torch sees CUDA and faiss has GPU support).
    """
    if faiss is None:  # pragma: no cover - faiss is a declared dependency
        raise ImportError("k-means needs faiss; install faiss-cpu (or faiss-gpu)")
    features = _check_features(torch.as_tensor(features))
    check_num_clusters(num_clusters, len(features))
    data = np.ascontiguousarray(features.numpy(), dtype=np.float32)
    # One GPU, not faiss's ``True`` (every visible GPU): under DDP the others belong to other ranks.
    gpus = 1 if _use_gpu(gpu) else False
    # faiss reads min_points_per_centroid only to print a hint on stderr below 39 points a cluster,
    # which k-means over a handful of label texts (spec 002's prototypes) would print at every refresh.
    clusterer = faiss.Kmeans(
        data.shape[1], num_clusters, niter=niter, nredo=nredo, seed=seed, verbose=False, gpu=gpus,
        max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1,
    )
    clusterer.train(data)
    centroids = torch.from_numpy(np.array(clusterer.centroids, dtype=np.float32))
    assignments = nearest_centroids(features, centroids)
    centroids, assignments, dropped = drop_empty_clusters(centroids, assignments)
    if dropped:
        warnings.warn(
            f"k-means: {dropped} of {num_clusters} clusters had no points after the final assignment "
            f"and were dropped; {len(centroids)} clusters remain, renumbered 0..{len(centroids) - 1}",
            stacklevel=2,
        )
    return KMeansResult(centroids, assignments, _inertia(features, centroids, assignments), dropped)


def _inertia(features: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor) -> float:
    # Recomputed in float64 rather than summing faiss's float32 distances, which lose precision
    # (||x||^2 + ||c||^2 - 2<x, c> cancels badly for points near their centroid).
    residuals = features.double() - centroids.double()[assignments]
    return float((residuals**2).sum())


def write_assignments(path: str | Path, assignments: torch.Tensor | np.ndarray) -> Path:
    """Write ``index,cluster`` rows, one per sample in index order; returns the path."""
    path = Path(path)
    ids = torch.as_tensor(assignments)
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            f"{path}: assignments must be a 1-D integer array, got {tuple(ids.shape)} {ids.dtype}"
        )
    if len(ids) and ids.min() < 0:
        raise ValueError(f"{path}: cluster ids must be >= 0, found {int(ids.min())}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(ASSIGNMENTS_HEADER)
        writer.writerows(enumerate(ids.tolist()))
    return path


def read_assignments(path: str | Path, num_items: int | None = None) -> torch.Tensor:
    """Cluster id of every sample ``[N]`` int64 (sample ``i`` at position ``i``).

    path: an ``assignments.csv`` file or a folder holding one. num_items: the size of the
    training set the file must describe; a mismatch means it came from another dataset or split.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ASSIGNMENTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such assignments file (write one with python -m tools.encode_and_cluster)"
        )
    rows = _parse_rows(path)
    clusters = _clusters_by_index(rows, path)
    if num_items is not None and len(clusters) != num_items:
        raise ValueError(
            f"{path}: has assignments for {len(clusters)} samples but the training set has {num_items}; "
            "was it made from another dataset or split?"
        )
    return clusters


def _parse_rows(path: Path) -> list[tuple[int, int, int]]:
    """``(line number, index, cluster)`` of every data row; blank lines are skipped."""
    with path.open(newline="") as handle:
        lines = list(csv.reader(handle))
    if not lines or [field.strip() for field in lines[0]] != ASSIGNMENTS_HEADER:
        found = ",".join(lines[0]) if lines else "an empty file"
        raise ValueError(f"{path}: line 1 must be the header 'index,cluster', found {found!r}")
    rows = []
    for line_number, fields in enumerate(lines[1:], start=2):
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(
                f"{path}, line {line_number}: expected 2 fields 'index,cluster', found {len(fields)}"
            )
        try:
            index, cluster = int(fields[0]), int(fields[1])
        except ValueError:
            raise ValueError(
                f"{path}, line {line_number}: index and cluster must be integers, found {','.join(fields)!r}"
            ) from None
        if index < 0 or cluster < 0:
            raise ValueError(
                f"{path}, line {line_number}: index and cluster must be >= 0, found {','.join(fields)!r}"
            )
        rows.append((line_number, index, cluster))
    if not rows:
        raise ValueError(f"{path}: holds a header but no assignments")
    return rows


def _clusters_by_index(rows: list[tuple[int, int, int]], path: Path) -> torch.Tensor:
    num_samples = len(rows)
    clusters = torch.full((num_samples,), -1, dtype=torch.long)
    first_line: dict[int, int] = {}
    for line_number, index, cluster in rows:
        if index in first_line:
            raise ValueError(
                f"{path}, line {line_number}: sample index {index} is duplicated "
                f"(first on line {first_line[index]})"
            )
        first_line[index] = line_number
        if index < num_samples:
            clusters[index] = cluster
    missing = (clusters < 0).nonzero().flatten()
    if len(missing):
        raise ValueError(
            f"{path}: sample index {int(missing[0])} is missing ({len(missing)} missing in all); "
            f"the {num_samples} rows must hold each index 0..{num_samples - 1} once"
        )
    return clusters
