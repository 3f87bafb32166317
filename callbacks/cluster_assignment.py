"""k-means cluster ids for every training item, shared by the methods that pair or pool by cluster.

Either the assignments are read once from ``assignments.csv`` (written by
``python -m tools.encode_and_cluster``), or k-means runs at fit start (and, with
``every_n_epochs``, again every that many epochs) on features the module computes:

1. every rank computes features of its shard of the training set, with the dataset indices;
2. all ranks gather features and indices (``all_gather`` on every rank), the repeats a
   distributed sampler pads its shards with are dropped, and rows are put in index order, so the
   result does not depend on the number of ranks;
3. rank 0 alone runs faiss k-means (on GPU when faiss has one), and the centroids and assignments
   are broadcast to every rank.

The assignments and centroids live in this callback's checkpoint state, so a resumed run keeps
the clusters it trained with. They are handed to the datamodule at every epoch start, before
the epoch's batches are drawn.

What the pair must provide: the datamodule ``num_train_items``, ``cluster_dataloader()``
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

from clustering.kmeans import check_num_clusters, kmeans, read_assignments
from modules.distributed import gather_rows


def first_of_each_index(indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in increasing index order, each index once (a padded sampler repeats some items)."""
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    first = torch.full((len(unique),), len(indices), dtype=torch.long, device=indices.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(indices), device=indices.device), reduce="amin")
    return unique, rows[first]


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
        seed, niter: of faiss k-means.
    """

    def __init__(self, assignments: str | None = None, num_clusters: int | None = None, every_n_epochs: int = 0,
                 seed: int = 0, niter: int = 25) -> None:
        if assignments is None and num_clusters is None:
            raise ValueError("ClusterAssignment needs assignments= (a precomputed assignments.csv) or num_clusters=")
        self.assignments_path = assignments
        self.num_clusters, self.every_n_epochs, self.seed, self.niter = num_clusters, every_n_epochs, seed, niter
        self.assignments: torch.Tensor | None = None
        self.centroids: torch.Tensor | None = None
        self.computed_at_epoch = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(trainer.datamodule, "set_cluster_assignments"):
            raise TypeError("ClusterAssignment needs a datamodule with num_train_items, cluster_dataloader() and "
                            f"set_cluster_assignments(); got {type(trainer.datamodule).__name__}")
        num_items = trainer.datamodule.num_train_items
        if self.assignments_path is not None:
            self.assignments = read_assignments(self.assignments_path, num_items=num_items)
            check_same_training_set(self.assignments_path, getattr(trainer.datamodule, "train_fingerprint", None))
        else:
            check_num_clusters(self.num_clusters, num_items, what="training items")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        due = self.every_n_epochs and epoch % self.every_n_epochs == 0 and epoch != self.computed_at_epoch
        if self.assignments_path is None and (self.assignments is None or due):
            self._run_kmeans(trainer, pl_module)
            self.computed_at_epoch = epoch
        trainer.datamodule.set_cluster_assignments(self.assignments)
        pl_module.log("cluster/num_nonempty", float(self.assignments.unique().numel()), sync_dist=True)

    @torch.no_grad()
    def _run_kmeans(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        indices, features = self._features(trainer, pl_module)
        indices, features = gather_rows(pl_module, indices), gather_rows(pl_module, features)
        indices, features = first_of_each_index(indices, features)
        if len(indices) != trainer.datamodule.num_train_items:
            raise RuntimeError(f"features of {len(indices)} items were computed; the training set has "
                               f"{trainer.datamodule.num_train_items} (cluster_dataloader must cover every item)")
        result = None
        if trainer.is_global_zero:
            fit = kmeans(features.float().cpu(), self.num_clusters, seed=self.seed, niter=self.niter)
            result = (fit.assignments, fit.centroids)
            rank_zero_info(f"k-means: {len(fit.centroids)} clusters of {len(indices)} items, inertia {fit.inertia:.4g}")
        self.assignments, self.centroids = trainer.strategy.broadcast(result, src=0)

    @staticmethod
    def _features(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = pl_module.training
        pl_module.eval()
        indices, features = [], []
        for batch in trainer.datamodule.cluster_dataloader():
            batch = trainer.strategy.batch_to_device(batch)
            indices.append(batch["index"])
            features.append(pl_module.cluster_features(batch).flatten(1))
        pl_module.train(was_training)
        return torch.cat(indices), torch.cat(features)

    def state_dict(self) -> dict[str, Any]:
        return {"assignments": self.assignments, "centroids": self.centroids, "computed_at_epoch": self.computed_at_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.assignments, self.centroids = state_dict["assignments"], state_dict["centroids"]
        self.computed_at_epoch = state_dict["computed_at_epoch"]

