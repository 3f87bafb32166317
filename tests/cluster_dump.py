"""A test-only callback: each rank writes the cluster ids its datamodule trained with."""

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class DumpClusterIds(Callback):
    def on_train_end(self, trainer, pl_module):
        ids = trainer.datamodule.cluster_ids
        torch.save(ids, Path(trainer.default_root_dir) / f"cluster_ids_rank{trainer.global_rank}.pt")
