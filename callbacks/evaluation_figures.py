"""Figures of the latest evaluation, drawn at the end of fit (the last validation) and of test.

A subclass says which figures a module's ``latest_evaluation`` (a dict with at least ``split``) gives;
this base draws them on rank 0, saves each as ``DIR/<folder>/{split}_{name}.png`` and logs it to W&B
under ``{split}/{name}`` when a ``WandbLogger`` is attached.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from matplotlib.figure import Figure


class EvaluationFigures(Callback):
    def __init__(self, folder: str = "plots") -> None:
        self.folder = folder

    def figures(self, pl_module: L.LightningModule, latest: dict) -> dict[str, Figure]:
        """``{name: figure}`` of one evaluation."""
        raise NotImplementedError

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module)

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        latest = getattr(pl_module, "latest_evaluation", None)
        if latest is None or not trainer.is_global_zero:
            return
        folder = Path(trainer.default_root_dir) / self.folder
        folder.mkdir(parents=True, exist_ok=True)
        for name, figure in self.figures(pl_module, latest).items():
            path = folder / f"{latest['split']}_{name}.png"
            figure.savefig(path)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(f"{latest['split']}/{name}", [str(path)], step=trainer.global_step)
