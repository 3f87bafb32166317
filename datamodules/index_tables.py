"""Base of the datamodules whose items are rows of in-memory tensor tables, batched by index.

Loaders hand out batches of dataset indices (``datamodules.index_batches``); the tables live on
the host, are copied once to each device they are asked for, and ``on_after_batch_transfer``
gathers the batch's rows there in one indexing operation. Subclasses say which tables a split
has (``host_tables``) and, where a batch is more than rows of tables, how to gather it
(``gather``). The base wires the samplers: shuffled full batches for training, contiguous
shards for evaluation, both sharded over ranks (issue 9, item 2).

Mid-epoch resume: Lightning saves the training loader's place with the fit loop, but applies it
only to a loader it builds after the restore. A module asking ``trainer.estimated_stepping_batches``
in ``configure_optimizers`` (every ``MethodModule`` does) has the loader built before it, and the
saved place is dropped (Lightning issue 20550), so the epoch would restart from its first batch.
The datamodule therefore also keeps the place in its own state, which Lightning restores before
any loader is built, and hands it to the training loader itself (issue 9, item 2).

Seeds: a datamodule's ``seed=None`` means the global seed set by ``seed_everything`` (Lightning
keeps it in ``PL_GLOBAL_SEED``, also for the processes it launches), else 0, so one
``seed_everything`` seeds the data too; an explicit ``seed`` wins (issue 9, item 7).
"""

from __future__ import annotations

import os
from typing import ClassVar

import lightning as L
import torch
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from datamodules.index_batches import EpochPermutation, HostFields, IndexBatchLoader, ItemDraw, rank_and_world

Tables = dict[str, torch.Tensor]


# The stage-to-split map of datamodules with separate validation and test splits; a trainer between
# runs (``None``) reads the test tables.
TRAIN_VAL_TEST_SPLITS: dict[RunningStage | None, str] = {
    RunningStage.TRAINING: "train",
    RunningStage.SANITY_CHECKING: "val",
    RunningStage.VALIDATING: "val",
    RunningStage.TESTING: "test",
    RunningStage.PREDICTING: "test",
    None: "test",
}


def resolve_seed(seed: int | None) -> int:
    """``seed`` itself, else the global seed of ``seed_everything``, else 0."""
    if seed is not None:
        return seed
    global_seed = os.environ.get("PL_GLOBAL_SEED")
    return int(global_seed) if global_seed is not None else 0


class IndexTablesDataModule(L.LightningDataModule):
    """Tables per split, cached per device; index loaders; the gather after the batch transfer.

    Subclasses call ``save_hyperparameters`` with ``batch_size``, ``eval_batch_size`` and
    ``seed`` among their arguments, then ``resolve_data_seed()``.
    """

    # Which split's tables a batch of each trainer stage is gathered from; ``None`` is a trainer
    # between runs (e.g. evaluation batches gathered by hand after ``fit``).
    STAGE_SPLITS: ClassVar[dict[RunningStage | None, str]] = {
        RunningStage.TRAINING: "train",
        RunningStage.SANITY_CHECKING: "eval",
        RunningStage.VALIDATING: "eval",
        RunningStage.TESTING: "eval",
        RunningStage.PREDICTING: "eval",
        None: "eval",
    }

    def __init__(self) -> None:
        super().__init__()
        self._device_tables: dict[tuple[str, torch.device], Tables] = {}
        self._train_place: dict[str, int] | None = None  # restored, for the next training loader

    def resolve_data_seed(self) -> None:
        """Fix ``hparams.seed`` to the seed in force at construction, so it is logged and saved as used."""
        self.hparams.seed = resolve_seed(self.hparams.seed)

    @property
    def batch_size(self) -> int:
        """Per device; linked to a model that takes it (TEMI's learning-rate scaling)."""
        return self.hparams.batch_size

    # ---- what subclasses provide -----------------------------------------------------------
    def host_tables(self, split: str) -> Tables:
        """Host tensors of ``split``, each with one row per item of that split."""
        raise NotImplementedError

    def gather(self, batch: dict, split: str) -> dict:
        """The batch with its items' rows of every table of ``split`` (subclasses gather more elaborately)."""
        tables = self.device_tables(split, batch["index"].device)
        return batch | {name: values[batch["index"]] for name, values in tables.items()}

    # ---- device tables ---------------------------------------------------------------------
    def device_tables(self, split: str, device: torch.device) -> Tables:
        key = (split, device)
        if key not in self._device_tables:
            self._device_tables[key] = {name: values.to(device) for name, values in self.host_tables(split).items()}
        return self._device_tables[key]

    def replace_device_column(self, split: str, name: str, values: torch.Tensor) -> None:
        """Swap one column of ``split``'s cached device tables, leaving the other columns where they are."""
        for (cached_split, device), tables in self._device_tables.items():
            if cached_split == split:
                tables[name] = values.to(device)

    def clear_device_tables(self) -> None:
        self._device_tables.clear()

    def current_split(self) -> str:
        stage = self.trainer.state.stage if self.trainer is not None else RunningStage.TRAINING
        return self.STAGE_SPLITS[stage]

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Gather the rows of this batch's indices from the tables on the batch's device."""
        return self.gather(batch, self.current_split())

    # ---- the training loader's place, carried in the datamodule's checkpoint state -------------
    def state_dict(self) -> dict:
        # The loader the fit iterates, not the latest one built: a callback may build its own (a
        # prototype refresh reading features), whose place means nothing to a resume.
        loader = self.trainer.train_dataloader if self.trainer is not None else None
        return {"train_loader": loader.state_dict()} if isinstance(loader, IndexBatchLoader) else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resuming a fit: the training loader continues the saved epoch after its last handed-out batch.

        Any other caller (a fresh fit reading another run's state for ``init_from``, an evaluation
        from a checkpoint) leaves the training loader at the start of its epoch.
        """
        trainer = self.trainer
        resuming = trainer is not None and trainer.ckpt_path is not None and trainer.state.fn == TrainerFn.FITTING
        self._train_place = state_dict.get("train_loader") if resuming else None

    # ---- loaders ---------------------------------------------------------------------------
    def train_sampler(self, num_items: int, rank: int, world_size: int) -> EpochPermutation:
        hp = self.hparams
        return EpochPermutation(num_items, hp.batch_size, shuffle=True, drop_last=True, seed=hp.seed,
                                rank=rank, world_size=world_size)

    def train_loader(self, num_items: int, draw: ItemDraw | None = None,
                     host_fields: HostFields | None = None) -> IndexBatchLoader:
        """Shuffled full batches, a new order each epoch, resumable mid-epoch."""
        loader = IndexBatchLoader(self.train_sampler(num_items, *rank_and_world(self.trainer)), draw, host_fields)
        if self._train_place is not None:  # Lightning restores the datamodule before building loaders
            loader.load_state_dict(self._train_place)
            self._train_place = None
        return loader

    @property
    def num_train_items(self) -> int:
        return len(next(iter(self.host_tables("train").values())))

    def training_items_dataloader(self) -> IndexBatchLoader:
        """Every training item once, in index order, in contiguous shards over ranks, without the
        training draws (no shuffle, no dropped remainder, no augmentation): what cluster assignments
        and prototype refreshes read features from. A datamodule whose training batches cannot be
        gathered without their draws overrides it."""
        return self.eval_loader(self.num_train_items)

    def eval_loader(self, num_items: int, draw: ItemDraw | None = None,
                    host_fields: HostFields | None = None) -> IndexBatchLoader:
        """Every item once, in order, in contiguous shards over ranks."""
        rank, world_size = rank_and_world(self.trainer)
        sampler = EpochPermutation(num_items, self.hparams.eval_batch_size, shuffle=False, drop_last=False,
                                   seed=self.hparams.seed, rank=rank, world_size=world_size)
        return IndexBatchLoader(sampler, draw, host_fields)
