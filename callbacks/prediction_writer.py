"""``DIR/predictions.csv`` from ``cli.py predict``: one row per item with its cluster."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Writes the 1-D tensors of each prediction dict as CSV columns, one file per rank
    (``predictions.csv``, or ``predictions.rank{r}.csv`` under DDP; their rows are disjoint)."""

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename

    def path(self, trainer: L.Trainer) -> Path:
        name = Path(self.filename)
        if trainer.world_size > 1:
            name = name.with_suffix(f".rank{trainer.global_rank}{name.suffix}")
        return Path(trainer.default_root_dir) / name

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        columns = {key: torch.cat([batch[key] for batch in batches]).cpu() for key in batches[0]
                   if batches[0][key].dim() == 1}  # per-item values; arrays are other writers' (latents)
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(zip(*(column.tolist() for column in columns.values())))
