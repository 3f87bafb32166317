"""``last.ckpt`` after every training epoch, whatever the best-checkpoint callback monitors."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """One rolling checkpoint of the latest epoch, with ``last.ckpt`` linked to it.

    Lightning 2.6 writes a monitoring callback's ``last.ckpt`` only in a step where it also saved
    a top-k checkpoint, so a run validated every 10 epochs, or whose metric stopped improving,
    would resume from an old epoch. This callback monitors nothing and saves at every training
    epoch end (after the module's own ``on_train_epoch_end``), so resuming never loses an epoch.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename="latest-{epoch}-{step}", monitor=None, save_top_k=1,
                         save_last="link", save_on_train_epoch_end=True)
