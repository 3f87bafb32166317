"""``DIR/metrics.json``: the final logged metrics of each stage that ran, ``{"fit": {...}, "test": {...}}``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class MetricsFile(Callback):
    """Writes the trainer's final logged metrics per stage to ``default_root_dir/filename`` (rank 0).

    A stage that runs again replaces its own entry and keeps the others.
    """

    def __init__(self, filename: str = "metrics.json") -> None:
        self.filename = filename

    def path(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.filename

    def write(self, trainer: L.Trainer, stage: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        path = self.path(trainer)
        record = json.loads(path.read_text()) if path.exists() else {}
        record[stage] = {name: _number(value) for name, value in sorted(trainer.callback_metrics.items())}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(partial, path)  # never leaves a half-written file behind

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, "fit")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.write(trainer, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, "test")


def _number(value: torch.Tensor | float) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None
