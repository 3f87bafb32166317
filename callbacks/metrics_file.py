"""``DIR/metrics.json``: the final logged metrics of each stage that ran, ``{"fit": {...}, "test": {...}}``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.json_files import finite_or_none, write_json_atomically


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
        record[stage] = {name: finite_or_none(value) for name, value in sorted(trainer.callback_metrics.items())}
        write_json_atomically(path, record)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, "fit")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.write(trainer, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, "test")

