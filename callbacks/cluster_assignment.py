"""k-means cluster ids for every training item, shared by the methods that pair or pool by cluster.

Either the assignments are read once from ``assignments.csv`` (written by
``python -m tools.encode_and_cluster``), or k-means runs at fit start (and, with
``every_n_epochs``, again every that many epochs) on features the module computes: the k-means
rule of ``clustering.prototypes.PrototypeMemory`` over the whole training set (issue 9, item 3):

1. every rank computes features of its shard of the training set, with the dataset indices
   (``callbacks.prototype_refresh.feature_pass``: no gradients, eval mode, the precision context);
2. the items faiss trains on (at most ``max_points_per_centroid * K``, drawn from the dataset
   indices and the seed alone) are gathered to rank 0, which runs faiss k-means (on GPU when
   faiss has one); the centroids are broadcast into a ``PrototypeMemory``;
3. every rank assigns its own shard to the nearest centroid, and only the int64 ids are gathered
   (the repeats a distributed sampler pads its shards with dropped, rows in index order).

Memory per rank: its shard's features, ``K x D`` centroids and ``N`` ids; rank 0 also holds the
sample. Neither the sample, the centroids nor the ids depend on the number of ranks, and with
``N <= max_points_per_centroid * K`` the sample is the whole training set.

The centroids are a ``PrototypeMemory`` a loss can read: the module's own, when
``prototypes_attr`` names one (it is then in the module's checkpoint), else the callback's.
The assignments (and the callback's memory) live in this callback's checkpoint state, so a
resumed run keeps the clusters it trained with. They are handed to the datamodule at every
epoch start, before the epoch's batches are drawn, and, on a resume, at train start: Lightning
resumes an epoch checkpointed part-way without ``on_train_epoch_start``, and the loader draws the
rest of that epoch from the restored ids (``datamodules.index_batches.IndexBatchLoader``).

What the pair must provide: the datamodule ``num_train_items``, ``training_items_dataloader()``
(batches with ``index``, covering every training item) and ``set_cluster_assignments(ids)``;
the module ``cluster_features(batch) -> [B, D]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from callbacks.prototype_refresh import feature_pass, memory_of
from clustering.kmeans import MAX_POINTS_PER_CENTROID, check_num_clusters, read_assignments
from clustering.prototypes import PrototypeMemory, first_of_each_index
from datamodules.index_tables import resolve_seed
from modules.distributed import gather_rows


def check_same_training_set(assignments_path: str, fingerprint: str | None) -> None:
    """Refuse assignments made from other samples of the same count (another toy seed, another
    split), when ``clusters.json`` beside them recorded the training set's fingerprint."""
    folder = Path(assignments_path)
    record_file = (folder if folder.is_dir() else folder.parent) / "clusters.json"
    if fingerprint is None or not record_file.is_file():
        return
    recorded = json.loads(record_file.read_text()).get("data", {})
    if recorded.get("fingerprint") not in (None, fingerprint):
        raise ValueError(f"{record_file}: the clusters were made from a different training set than this run's "
                         f"(data arguments there: {recorded}); rerun encode_and_cluster with this run's data arguments")


class ClusterAssignment(Callback):
    """Cluster ids of the training items, precomputed or by k-means on the module's features.

    Args:
        assignments: ``assignments.csv`` (or the folder holding it); when given, no k-means runs.
        num_clusters: k of the k-means run (required without ``assignments``).
        every_n_epochs: recompute every this many epochs (0: once, at fit start).
        seed, niter, max_points_per_centroid: of faiss k-means; ``seed=None`` takes the global
            seed of ``seed_everything`` (else 0).
        prototypes_attr: the module attribute holding the ``PrototypeMemory`` (``num_clusters``
            rows) the centroids go to; default a memory of the callback's own.
    """

    def __init__(self, assignments: str | None = None, num_clusters: int | None = None, every_n_epochs: int = 0,
                 seed: int | None = None, niter: int = 25, max_points_per_centroid: int = MAX_POINTS_PER_CENTROID,
                 prototypes_attr: str | None = None) -> None:
        if assignments is None and num_clusters is None:
            raise ValueError("ClusterAssignment needs assignments= (a precomputed assignments.csv) or num_clusters=")
        self.assignments_path = assignments
        self.num_clusters, self.every_n_epochs, self.seed, self.niter = num_clusters, every_n_epochs, seed, niter
        self.max_points_per_centroid, self.prototypes_attr = max_points_per_centroid, prototypes_attr
        self.assignments: torch.Tensor | None = None
        self.prototypes: PrototypeMemory | None = None  # the callback's own, without prototypes_attr
        self.computed_at_epoch = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(trainer.datamodule, "set_cluster_assignments"):
            raise TypeError("ClusterAssignment needs a datamodule with num_train_items, training_items_dataloader() and "
                            f"set_cluster_assignments(); got {type(trainer.datamodule).__name__}")
        num_items = trainer.datamodule.num_train_items
        if self.assignments_path is not None:
            self.assignments = read_assignments(self.assignments_path, num_items=num_items)
            check_same_training_set(self.assignments_path, getattr(trainer.datamodule, "train_fingerprint", None))
            return
        check_num_clusters(self.num_clusters, num_items, what="training items")
        if self.prototypes_attr is not None:
            rows = memory_of(pl_module, self.prototypes_attr).num_prototypes
            if rows != self.num_clusters:
                raise ValueError(f"{type(pl_module).__name__}.{self.prototypes_attr} holds {rows} prototypes; "
                                 f"ClusterAssignment makes num_clusters={self.num_clusters}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Ids restored from a checkpoint reach the data here too: a mid-epoch resume skips the
        # resumed epoch's start (a fresh k-means run has none yet; a precomputed file repeats a swap).
        if self.assignments is not None:
            trainer.datamodule.set_cluster_assignments(self.assignments)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        due = self.every_n_epochs and epoch % self.every_n_epochs == 0 and epoch != self.computed_at_epoch
        if self.assignments_path is None and (self.assignments is None or due):
            self._run_kmeans(trainer, pl_module)
            self.computed_at_epoch = epoch
        trainer.datamodule.set_cluster_assignments(self.assignments)
        pl_module.log("cluster/num_nonempty", float(self.assignments.unique().numel()), sync_dist=True)

    def _run_kmeans(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        num_items = trainer.datamodule.num_train_items
        with feature_pass(trainer, pl_module):
            indices, features = self._features(trainer, pl_module)
            memory = self._memory(pl_module, features.shape[1])
            memory.refresh_kmeans(features, indices, num_items, seed=resolve_seed(self.seed), niter=self.niter,
                                  max_points_per_centroid=self.max_points_per_centroid)
            clusters = memory.nearest(features)
        indices, clusters = first_of_each_index(gather_rows(pl_module, indices), gather_rows(pl_module, clusters))
        if len(indices) != num_items:
            raise RuntimeError(f"features of {len(indices)} items were computed; the training set has "
                               f"{num_items} (training_items_dataloader must cover every item)")
        self.assignments = clusters.cpu()
        rank_zero_info(f"k-means: {int((memory.counts > 0).sum())} clusters of {num_items} items, fitted on "
                       f"{int(memory.counts.sum())} of them")

    def _memory(self, pl_module: L.LightningModule, dim: int) -> PrototypeMemory:
        if self.prototypes_attr is not None:
            return memory_of(pl_module, self.prototypes_attr)
        if self.prototypes is None or self.prototypes.prototypes.shape != (self.num_clusters, dim):
            self.prototypes = PrototypeMemory(self.num_clusters, dim)
        return self.prototypes.to(pl_module.device)

    @staticmethod
    def _features(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        indices, features = [], []
        for batch in trainer.datamodule.training_items_dataloader():
            batch = trainer.strategy.batch_to_device(batch)
            indices.append(batch["index"])
            features.append(pl_module.cluster_features(batch).flatten(1))
        return torch.cat(indices), torch.cat(features)

    def state_dict(self) -> dict[str, Any]:
        prototypes = None if self.prototypes is None else self.prototypes.state_dict()
        return {"assignments": self.assignments, "prototypes": prototypes, "computed_at_epoch": self.computed_at_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.assignments, self.computed_at_epoch = state_dict["assignments"], state_dict["computed_at_epoch"]
        saved = state_dict.get("prototypes")
        if saved is not None:
            self.prototypes = PrototypeMemory(*saved["prototypes"].shape)
            self.prototypes.load_state_dict(saved)
