"""The resolved run configuration, saved beside the run and sent to every logger (W&B's config)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback


class LogConfig(SaveConfigCallback):
    """Writes ``config.yaml`` to the run folder and records the same config with each logger."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.config.as_dict()
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})
