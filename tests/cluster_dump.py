"""A test-only callback: each rank writes the cluster ids its datamodule trained with and the
k-means prototypes its ClusterAssignment callback holds."""

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from callbacks.cluster_assignment import ClusterAssignment


class DumpClusterIds(Callback):
    def on_train_end(self, trainer, pl_module):
        root, rank = Path(trainer.default_root_dir), trainer.global_rank
        torch.save(trainer.datamodule.cluster_ids, root / f"cluster_ids_rank{rank}.pt")
        assignment = next(callback for callback in trainer.callbacks if isinstance(callback, ClusterAssignment))
        torch.save(assignment.prototypes.state_dict(), root / f"prototypes_rank{rank}.pt")
