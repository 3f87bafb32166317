"""Batches made of cluster-mates: ``m`` clusters times ``n`` samples, so every sample has a partner.

With random batches a sample finds a cluster-mate only if another member of its cluster happens
to be drawn: at 500 clusters and batch 64 most samples have none. Here each rank's batch is
``batch_size // samples_per_cluster`` groups of ``samples_per_cluster`` members of one cluster.

Per epoch, every cluster's members are shuffled and cut into groups of ``n``; a last, short group
is topped up with other members of the same cluster (repeating members only when the cluster has
fewer than ``n``). All groups are shuffled and dealt out to batches, so a cluster is drawn in
proportion to its size and each sample appears about once per epoch. Like ``EpochPermutation``,
everything is drawn from a generator seeded by ``(seed, epoch)``, and the global batch ``i`` is the
same whatever the world size: rank ``r`` takes the ``r``-th run of ``m`` groups.

The epoch has as many batches as plain batching (``N // global_batch``), so Lightning's batch
counts and schedules do not depend on the clusters, which may only be known once training starts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from datamodules.index_batches import EpochPermutation

ClusterTable = Callable[[], "torch.Tensor | None"]


class ClusterMateBatches(EpochPermutation):
    """Training batches of ``m`` clusters x ``n`` samples (``n = samples_per_cluster``).

    Args:
        cluster_ids: returns the current cluster id of every training item ``[N]`` (read at the
            start of every epoch, as assignments may be recomputed), or ``None`` when not known yet.
        samples_per_cluster: ``n``; must divide ``batch_size``.
    """

    def __init__(self, num_items: int, batch_size: int, samples_per_cluster: int, cluster_ids: ClusterTable,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(num_items, batch_size, shuffle=True, drop_last=True, seed=seed, rank=rank,
                         world_size=world_size)
        if samples_per_cluster < 2 or batch_size % samples_per_cluster:
            raise ValueError(
                f"samples_per_cluster={samples_per_cluster} must be at least 2 and divide batch_size={batch_size}"
            )
        self.samples_per_cluster = samples_per_cluster
        self.clusters_per_batch = batch_size // samples_per_cluster
        self.cluster_ids = cluster_ids

    def rank_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        groups = self._groups(self._current_ids(), generator)
        groups = groups[torch.randperm(len(groups), generator=generator)]
        per_global_batch = self.clusters_per_batch * self.world_size
        used = groups[: len(self) * per_global_batch].view(len(self), self.world_size, -1)
        return list(used[:, self.rank].unbind(0))

    def _current_ids(self) -> torch.Tensor:
        ids = self.cluster_ids()
        if ids is None:
            raise RuntimeError(
                "cluster-mate batches need cluster assignments before the epoch starts: add the "
                "ClusterAssignment callback (precomputed assignments or k-means at fit start)"
            )
        if ids.shape != (self.num_items,):
            raise ValueError(f"cluster ids have shape {tuple(ids.shape)}, expected [{self.num_items}] (one per item)")
        return ids.cpu()

    def _groups(self, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Groups ``[G, n]`` of item indices, each group from one cluster, covering every item."""
        n = self.samples_per_cluster
        groups = []
        order = torch.argsort(ids, stable=True)
        for members in order.split(torch.bincount(ids).tolist()):
            if len(members) == 0:
                continue
            members = members[torch.randperm(len(members), generator=generator)]
            groups.append(torch.cat([members, self._top_up(members, n, generator)]).view(-1, n))
        return torch.cat(groups)

    @staticmethod
    def _top_up(members: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """Members that complete the last group to ``n``: ones outside it, if the cluster has enough."""
        short = -len(members) % n
        if short == 0:
            return members[:0]
        outside = members[: len(members) - (n - short)]
        if len(outside) >= short:
            return outside[torch.randperm(len(outside), generator=generator)[:short]]
        return members[torch.randint(len(members), (short,), generator=generator)]
