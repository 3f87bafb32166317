"""Prototypes a loss reads: ``K`` rows of ``D`` features with an int64 key and a count each (issue 9, item 3).

``PrototypeMemory`` is an ``nn.Module`` holding buffers only, so it sits in a LightningModule's
``state_dict`` (saved in checkpoints) and moves with it. Every rank holds the same rows: both
refresh rules are collectives that every rank calls, on the default process group when one is
initialized (what Lightning's DDP sets up), and plain local computations otherwise.

(a) Per-key means (``key_sums`` then ``update_means``, or ``refresh_means`` in one call): each rank
    sums its features and counts per key, the sums are ``all_reduce``d over ranks and divided,
    ``mean_k = sum_r S_rk / sum_r n_rk``. With a momentum ``m`` a row already filled becomes
    ``m * old_k + (1 - m) * mean_k``; a row filled for the first time takes ``mean_k``; keys no rank
    saw keep their row. Optionally the updated rows are L2-normalized.
(b) k-means (``refresh_kmeans``): the points faiss trains on (``clustering.kmeans.kmeans_sample``,
    at most ``max_points_per_centroid * K``, chosen from the dataset indices and the seed alone) are
    gathered to rank 0, which runs faiss k-means; the rows are broadcast. Rows ``K'..K-1`` left by
    dropped empty clusters hold key ``EMPTY_KEY`` and count 0. Per rank this costs the rank's own
    features plus ``K x D``; rank 0 also holds the sample, ``max_points_per_centroid * K x D`` floats.

``counts[k]`` is the number of items behind row ``k`` at its latest refresh (0: never filled).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clustering.kmeans import (
    MAX_POINTS_PER_CENTROID,
    check_num_clusters,
    kmeans,
    kmeans_sample,
    nearest_centroids,
)

EMPTY_KEY = -1


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if _rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def gather_to_zero(rows: torch.Tensor) -> torch.Tensor | None:
    """``rows [n_r, ...]`` of every rank concatenated in rank order on rank 0 (``None`` on the others).

    Ranks may hold different ``n_r``: each pads to the largest and the padding is cut on rank 0.
    """
    rank, world = _rank_and_world()
    if world == 1:
        return rows
    count = torch.tensor([len(rows)], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: len(rows)] = rows
    buckets = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, buckets, dst=0)
    return torch.cat([bucket[:n] for bucket, n in zip(buckets, counts)]) if rank == 0 else None


def first_of_each_index(indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in increasing index order, each index once (a padded sampler repeats some items)."""
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    first = torch.full((len(unique),), len(indices), dtype=torch.long, device=indices.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(indices), device=indices.device), reduce="amin")
    return unique, rows[first]


def positions_in(table: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Position of each of ``values`` in ``table`` (distinct entries, at least one), -1 where it is absent."""
    order = table.argsort()
    ordered = table[order]
    slot = torch.searchsorted(ordered, values.contiguous()).clamp(max=len(table) - 1)
    return torch.where(ordered[slot] == values, order[slot], -1)


class PrototypeMemory(nn.Module):
    """``prototypes [K, D]`` float, ``keys [K]`` int64 (distinct, >= 0, or ``EMPTY_KEY``), ``counts [K]`` int64.

    Args:
        num_prototypes: ``K``.
        dim: ``D``.
        keys: the key of each row (a class id, an attribute-combination id, a label-text id);
            default ``0..K-1``.
    """

    def __init__(self, num_prototypes: int, dim: int, keys: Sequence[int] | torch.Tensor | None = None) -> None:
        super().__init__()
        if num_prototypes < 1 or dim < 1:
            raise ValueError(f"a prototype memory needs K >= 1 rows of D >= 1 features, got K={num_prototypes}, D={dim}")
        keys = torch.arange(num_prototypes) if keys is None else torch.as_tensor(keys)
        if keys.shape != (num_prototypes,) or keys.is_floating_point() or keys.dtype == torch.bool:
            raise ValueError(f"prototype keys must be {num_prototypes} integers, got {tuple(keys.shape)} {keys.dtype}")
        if len(keys.unique()) != num_prototypes or keys.min() < 0:
            raise ValueError(f"prototype keys must be distinct and >= 0, got {keys.tolist()[:10]}...")
        self.register_buffer("prototypes", torch.zeros(num_prototypes, dim))
        self.register_buffer("keys", keys.long().clone())
        self.register_buffer("counts", torch.zeros(num_prototypes, dtype=torch.long))

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def dim(self) -> int:
        return self.prototypes.shape[1]

    def extra_repr(self) -> str:
        return f"num_prototypes={self.num_prototypes}, dim={self.dim}"

    def _check_features(self, features: torch.Tensor, labels: torch.Tensor, what: str) -> None:
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"prototype features must have shape [N, {self.dim}], got {tuple(features.shape)}")
        if labels.shape != (len(features),) or labels.is_floating_point():
            raise ValueError(f"{what} must be {len(features)} integers (one per feature row), "
                             f"got {tuple(labels.shape)} {labels.dtype}")

    def rows_of(self, keys: torch.Tensor) -> torch.Tensor:
        """Row of each key ``[N]``; a key the memory does not hold is an error naming it."""
        if len(keys) and keys.min() < 0:
            raise ValueError(f"prototype keys must be >= 0, got {int(keys.min())}")
        rows = positions_in(self.keys, keys)
        if (rows < 0).any():
            missing = keys[rows < 0].unique()
            raise ValueError(f"keys {missing[:10].tolist()} are not among the memory's {self.num_prototypes} "
                             f"keys ({len(missing)} unknown in all)")
        return rows

    # ---- (a) per-key means -------------------------------------------------------------------
    @torch.no_grad()
    def key_sums(self, features: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's float32 feature sums ``[K, D]`` and item counts ``[K]`` per key: add up over batches."""
        self._check_features(features, keys, "keys")
        rows = self.rows_of(keys)
        sums = torch.zeros(self.num_prototypes, self.dim, device=features.device)
        sums.index_add_(0, rows, features.float())
        return sums, torch.bincount(rows, minlength=self.num_prototypes)

    @torch.no_grad()
    def update_means(self, sums: torch.Tensor, counts: torch.Tensor, momentum: float = 0.0,
                     normalize: bool = False) -> None:
        """Rule (a) from this rank's ``key_sums``: a collective, every rank calls it."""
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"prototype momentum must lie in [0, 1), got {momentum}")
        if sums.shape != self.prototypes.shape or counts.shape != (self.num_prototypes,):
            raise ValueError(f"key sums must have shapes {tuple(self.prototypes.shape)} and ({self.num_prototypes},), "
                             f"got {tuple(sums.shape)} and {tuple(counts.shape)}")
        sums, counts = _all_reduce_(sums.float().clone()), _all_reduce_(counts.long().clone())
        means = sums / counts.clamp(min=1).unsqueeze(1)
        old = self.prototypes.float()
        blended = torch.where((self.counts > 0).unsqueeze(1), momentum * old + (1 - momentum) * means, means)
        if normalize:
            blended = F.normalize(blended, dim=1)
        seen = counts > 0
        self.prototypes.copy_(torch.where(seen.unsqueeze(1), blended, old))
        self.counts.copy_(torch.where(seen, counts, self.counts))

    def refresh_means(self, features: torch.Tensor, keys: torch.Tensor, momentum: float = 0.0,
                      normalize: bool = False) -> None:
        """Rule (a) on one tensor of features per rank."""
        self.update_means(*self.key_sums(features, keys), momentum=momentum, normalize=normalize)

    # ---- (b) k-means ----------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_kmeans(self, features: torch.Tensor, indices: torch.Tensor, num_items: int | None = None,
                       seed: int = 0, niter: int = 25,
                       max_points_per_centroid: int = MAX_POINTS_PER_CENTROID) -> None:
        """Rule (b): every rank passes its items' features and dataset ``indices`` (repeats allowed);
        rank 0 fits ``K`` centroids on the sample, which every rank then holds. A collective.

        num_items: the dataset size the sample is drawn from; default the largest index + 1 over ranks.
        """
        self._check_features(features, indices, "dataset indices")
        if num_items is None:
            largest = indices.max() if len(indices) else torch.tensor(-1, device=indices.device)
            num_items = int(_all_reduce_(largest.long().clone(), dist.ReduceOp.MAX)) + 1
        check_num_clusters(self.num_prototypes, num_items, what="items")
        sample = kmeans_sample(num_items, self.num_prototypes, max_points_per_centroid, seed).to(indices.device)
        positions = positions_in(sample, indices.long())
        in_sample = positions >= 0
        self._check_sample_covered(positions[in_sample], features, len(sample))
        sample_positions = gather_to_zero(positions[in_sample])
        sample_features = gather_to_zero(features[in_sample].float())
        if _rank_and_world()[0] == 0:
            _, sample_features = first_of_each_index(sample_positions, sample_features)  # in sample order
            fit = kmeans(sample_features.cpu(), self.num_prototypes, seed=seed, niter=niter,
                         max_points_per_centroid=max_points_per_centroid)
            self._write_centroids(fit.centroids, torch.bincount(fit.assignments))
        self.broadcast_(src=0)

    def _check_sample_covered(self, positions: torch.Tensor, features: torch.Tensor, sample_size: int) -> None:
        # Checked on every rank alike (two small all_reduces), so a bad input raises everywhere
        # instead of on rank 0 alone while the others wait in its broadcast. Every feature must be
        # finite, not just the sample's: all of them are assigned to a centroid afterwards.
        covered = torch.zeros(sample_size, dtype=torch.int32, device=positions.device)
        covered[positions] = 1
        _all_reduce_(covered, dist.ReduceOp.MAX)
        finite = _all_reduce_(torch.isfinite(features).all().int(), dist.ReduceOp.MIN)
        if not finite:
            raise ValueError("k-means prototype features hold NaN or inf (on at least one rank)")
        missing = int((covered == 0).sum())
        if missing:
            raise ValueError(f"features of {missing} of the {sample_size} items k-means samples are missing; "
                             "every item of the dataset must be passed on some rank")

    def _write_centroids(self, centroids: torch.Tensor, counts: torch.Tensor) -> None:
        found = len(centroids)
        self.prototypes.zero_()
        self.prototypes[:found] = centroids.to(self.prototypes)
        self.keys.fill_(EMPTY_KEY)
        self.keys[:found] = torch.arange(found, device=self.keys.device)
        self.counts.zero_()
        self.counts[:found] = counts.to(self.counts)

    def broadcast_(self, src: int = 0) -> None:
        """Every rank takes rank ``src``'s rows, keys and counts (a collective)."""
        if _rank_and_world()[1] > 1:
            for buffer in (self.prototypes, self.keys, self.counts):
                dist.broadcast(buffer, src=src)

    # ---- reading ------------------------------------------------------------------------------
    @torch.no_grad()
    def nearest(self, features: torch.Tensor) -> torch.Tensor:
        """Key ``[N]`` of each row's nearest filled prototype (count > 0), e.g. the cluster id after k-means."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"prototype features must have shape [N, {self.dim}], got {tuple(features.shape)}")
        filled = self.counts > 0
        if not filled.any():
            raise RuntimeError("the prototype memory has no filled rows yet; refresh it first")
        return self.keys[filled][nearest_centroids(features, self.prototypes[filled])]
