"""Progress reporting that is safe under DDP, and readable in a log file (issue 9, item 9)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

# Shown in a validation line besides every top-level ``val/`` metric.
MAIN_PREFIXES = ("val/", "gate/")


class EpochMetricsOnEveryRank(Callback):
    """Reduces the epoch values of the training metrics on every rank at once, at train epoch end.

    Lightning reduces a metric logged with ``on_epoch=True, sync_dist=True`` lazily, at the first
    read of ``trainer.callback_metrics`` (or ``progress_bar_metrics``) after the epoch's last batch.
    Its progress bars, TQDM and Rich alike, make that read in their ``on_train_epoch_end`` on rank 0
    alone (Lightning issue 21264), so rank 0's reduce meets whatever collective the other ranks run
    next, such as a module's own reduce in ``on_train_epoch_end``: a size mismatch under gloo, a
    hang under NCCL. Read here first, on every rank, the reduce runs everywhere together and the
    bar later finds its values computed. The CLI puts this callback ahead of every other one.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _ = trainer.callback_metrics  # the read is the point: it computes (and caches) the epoch values


class ValidationLines(Callback):
    """One line per validation for output that is not a terminal (a cluster job's log, CI): the
    step, the epoch, the progress-bar metrics, the top-level validation metrics and the gate's
    state (``gate/*``, put into ``callback_metrics`` by ``PhaseGate``). Printed by rank 0.

    Runs no collective: by ``on_validation_end`` Lightning has reduced the validation metrics on
    every rank, so reading them is a lookup.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        print(validation_line(trainer.global_step, trainer.current_epoch,
                              trainer.progress_bar_metrics | main_metrics(trainer.callback_metrics)), flush=True)


def main_metrics(metrics: dict) -> dict:
    """The metrics named ``val/<name>`` or ``gate/<name>`` (not the per-head or per-kind ones below them)."""
    return {name: value for name, value in metrics.items()
            if name.startswith(MAIN_PREFIXES) and name.count("/") == 1}


def validation_line(step: int, epoch: int, metrics: dict) -> str:
    """``validation step=S epoch=E name=value ...``, names sorted, numbers to 4 significant digits."""
    fields = [f"step={step}", f"epoch={epoch}"]
    fields += [f"{name}={float(value):.4g}" for name, value in sorted(metrics.items())]
    return "validation " + " ".join(fields)
