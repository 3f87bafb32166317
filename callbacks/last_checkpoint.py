"""``last.ckpt`` after every training epoch and at an interrupt, written so a kill never leaves it unreadable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class LastCheckpoint(ModelCheckpoint):
    """One rolling checkpoint of the latest epoch, with ``last.ckpt`` linked to it.

    Lightning 2.6 writes a monitoring callback's ``last.ckpt`` only in a step where it also saved
    a top-k checkpoint, so a run validated every 10 epochs, or whose metric stopped improving,
    would resume from an old epoch. This callback monitors nothing and saves at every training
    epoch end (after the module's own ``on_train_epoch_end``), so resuming never loses an epoch.

    Ctrl-C (SIGINT) or a scheduler's SIGTERM during ``fit`` (issue 9, item 5) saves the state of
    the step that was running, with ``last.ckpt`` linked to it, so ``--ckpt_path last`` continues
    from there: Lightning turns SIGTERM into an exception after the current batch (on every rank,
    from rank 0's signal) and hands either interrupt to ``on_exception``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename="latest-{epoch}-{step}", monitor=None, save_top_k=1,
                         save_last="link", save_on_train_epoch_end=True, save_on_exception=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their path and renamed into place, so a kill during a write
    leaves the previous file whole (item 5); an unreadable one fails with an error naming it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, path)

    def load_checkpoint(self, path: str | Path, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RuntimeError(f"cannot read checkpoint {path}: {reason}") from error
