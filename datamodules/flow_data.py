"""Samples ``x1`` to generate, source draws ``x0``, and cluster ids: the data side of flow matching (spec 000).

Datasets (``datamodules.point_sets``): ``moons`` and ``checkerboard`` (2-D toys, generated),
``digits`` (scikit-learn's, the offline default), ``mnist`` (IDX files in ``path``) and ``npy``
(an array file at ``path``). The held-out split is fixed whatever the training seed: toys draw it
from their own seed, digits and user arrays hold out ``eval_fraction`` by a permutation seeded
with 0, MNIST uses its ``t10k`` files when present.

Every batch carries dataset ``index`` (so cluster ids can be looked up), ``x0`` (a source draw per
item) and, once assignments are known, ``cluster``. Training batches also carry the flow time
``t ~ U(0, 1)`` ``[B]`` and ``noise ~ N(0, I)`` of the sample shape (the random perturbation's).
All three are the item's own draws of the epoch, keyed by (seed, epoch, dataset index) as the
index loader draws them, so resumed runs see the same pairs and the values of an item do not
depend on the number of ranks, yet differ between the items of different ranks (issue 9,
item 7). ``samples_per_cluster > 0`` switches training batches to cluster-mates
(``datamodules.cluster_batches``); ``pairing`` reassigns a training batch's source draws to its samples
by minibatch optimal transport, over the batch or within each of its clusters (``datamodules.couplings``).
Evaluation batches draw ``x0`` from a fixed generator, so
every evaluation starts from the same noise.

For the ``ClusterAssignment`` callback this datamodule provides ``training_items_dataloader()``,
``num_train_items``, ``set_cluster_assignments(ids)`` and ``train_fingerprint``.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from typing import Literal

import torch

from datamodules import point_sets
from datamodules.cluster_batches import ClusterMateBatches
from datamodules.couplings import PAIRINGS, Pairing, paired_sources
from datamodules.index_batches import EpochPermutation, IndexBatchLoader, ItemDraw, rank_and_world
from datamodules.index_tables import IndexTablesDataModule, Tables

Dataset = Literal["moons", "checkerboard", "digits", "mnist", "npy"]
TOYS = {"moons": point_sets.moons, "checkerboard": point_sets.checkerboard}
EVAL_SEED_OFFSET = 7_919  # toys' held-out points and evaluation noise come from seed + this


def _fixed_split(x: torch.Tensor, y: torch.Tensor | None, eval_fraction: float, source: str):
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    num_eval = max(1, round(eval_fraction * len(x)))
    if num_eval >= len(x):
        raise ValueError(f"{source}: {len(x)} samples are too few to hold out {eval_fraction:.0%} for evaluation")
    parts = order[num_eval:], order[:num_eval]
    return [{"x": x[p]} | ({"y": y[p]} if y is not None else {}) for p in parts]


def fingerprint(samples: torch.Tensor) -> str:
    """A short hash of the samples' values and shape: tells whether two sets are the same training set."""
    digest = hashlib.sha256(str(tuple(samples.shape)).encode())
    digest.update(samples.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def source_draw(source: str, shape: tuple[int, ...], fixed_seed: int | None = None) -> ItemDraw:
    """One source sample ``x0`` per item, from the epoch's generator (or a fixed one for evaluation)."""

    def draw(generator: torch.Generator, num_items: int) -> dict[str, torch.Tensor]:
        if fixed_seed is not None:
            generator = torch.Generator().manual_seed(fixed_seed)
        return {"x0": point_sets.source_samples(source, num_items, shape, generator)}

    return draw


def training_draw(source: str, shape: tuple[int, ...]) -> ItemDraw:
    """Per item and epoch: the source draw ``x0``, the flow time ``t ~ U(0, 1)`` of
    ``x_t = (1 - t) x0 + t x1`` and the perturbation ``noise ~ N(0, I)`` (spec 000)."""

    def draw(generator: torch.Generator, num_items: int) -> dict[str, torch.Tensor]:
        x0 = point_sets.source_samples(source, num_items, shape, generator)  # first: the same x0 as ever
        return {"x0": x0, "t": torch.rand(num_items, generator=generator),
                "noise": torch.randn(num_items, *shape, generator=generator)}

    return draw


class FlowDataModule(IndexTablesDataModule):
    """Data for flow matching from a source to a dataset.

    Args:
        dataset: ``moons``, ``checkerboard``, ``digits``, ``mnist`` (IDX folder ``path``) or
            ``npy`` (array file ``path``, read with ``key`` from an ``.npz``/dict ``.pt``).
        source: ``gaussian`` or ``8gaussians`` (2-D only).
        num_train, num_eval: toy sizes; for the other datasets ``num_train`` keeps the first
            ``num_train`` training samples (``None``: all) and ``num_eval`` caps the held-out set.
        eval_fraction: held out from digits and user arrays (and MNIST without ``t10k`` files).
        batch_size: per device.
        samples_per_cluster: ``n`` of the cluster-mate batches (``batch_size / n`` clusters per
            batch); 0 draws plain shuffled batches.
        pairing: which draw ``x0`` each training sample flows from (``datamodules.couplings``):
            ``independent`` (its own), ``minibatch_ot`` (the batch's exact OT plan) or ``cluster_ot``
            (the OT plan within each cluster of the batch).
        seed: seeds epoch orders and the items' draws (with the epoch number) and the toys' training
            set; ``None``: the global seed of ``seed_everything``.
    """

    def __init__(
        self,
        dataset: Dataset = "digits",
        path: str | None = None,
        key: str | None = None,
        source: Literal["gaussian", "8gaussians"] = "gaussian",
        num_train: int | None = None,
        num_eval: int | None = None,
        eval_fraction: float = 0.2,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        samples_per_cluster: int = 0,
        pairing: Pairing = "independent",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.resolve_data_seed()
        if dataset in ("mnist", "npy") and path is None:
            raise ValueError(f"dataset={dataset!r} reads from data.path; give the {dataset} file or folder")
        if dataset not in (*TOYS, "digits", "mnist", "npy"):
            raise ValueError(f"dataset must be one of moons, checkerboard, digits, mnist, npy; got {dataset!r}")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}; got {pairing!r}")
        self.cluster_ids: torch.Tensor | None = None

    def __str__(self) -> str:
        return f"{type(self).__name__}(dataset={self.hparams.dataset!r}, source={self.hparams.source!r})"

    # ---- what the model is linked to -------------------------------------------------------
    @property
    def sample_shape(self) -> list[int]:
        return list(self.train_split["x"].shape[1:])

    @property
    def num_train_items(self) -> int:
        return len(self.train_split["x"])

    @cached_property
    def train_fingerprint(self) -> str:
        """Hash of the training samples, recorded by ``encode_and_cluster`` and checked against its output."""
        return fingerprint(self.train_split["x"])

    # ---- loading ---------------------------------------------------------------------------
    @cached_property
    def _splits(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        hp = self.hparams
        if hp.dataset in TOYS:
            make = TOYS[hp.dataset]
            train = {"x": make(hp.num_train or 8000, hp.seed)}
            return train, {"x": make(hp.num_eval or 2000, hp.seed + EVAL_SEED_OFFSET)}
        if hp.dataset == "mnist":
            train, held_out = point_sets.mnist(hp.path, "train"), point_sets.mnist(hp.path, "t10k")
            if not held_out:
                train, held_out = _fixed_split(train["x"], train.get("y"), hp.eval_fraction, hp.path)
        else:
            x, y = point_sets.digits() if hp.dataset == "digits" else (point_sets.user_array(hp.path, hp.key), None)
            train, held_out = _fixed_split(x, y, hp.eval_fraction, hp.path or "digits")
        return self._capped(train, hp.num_train), self._capped(held_out, hp.num_eval)

    @staticmethod
    def _capped(split: dict[str, torch.Tensor], num: int | None) -> dict[str, torch.Tensor]:
        return {name: values[:num] for name, values in split.items()} if num else split

    @property
    def train_split(self) -> dict[str, torch.Tensor]:
        return self._splits[0]

    @property
    def eval_split(self) -> dict[str, torch.Tensor]:
        return self._splits[1]

    # ---- cluster ids -----------------------------------------------------------------------
    def set_cluster_assignments(self, cluster_ids: torch.Tensor) -> None:
        """Cluster id of every training item ``[N]``; batches carry ``cluster`` from then on."""
        if cluster_ids.shape != (self.num_train_items,):
            raise ValueError(f"cluster assignments of shape {tuple(cluster_ids.shape)} do not match the "
                             f"{self.num_train_items} training items")
        self.cluster_ids = cluster_ids.long().cpu()
        # Called at every epoch start: swap the ids in the device tables, never re-upload the samples.
        self.replace_device_column("train", "cluster", self.cluster_ids)

    # ---- loaders ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        hp = self.hparams
        shape = tuple(self.sample_shape)
        point_sets.source_samples(hp.source, 1, shape, torch.Generator())  # a bad source fails here
        if stage == "fit" and len(self.train_split["x"]) < hp.batch_size * rank_and_world(self.trainer)[1]:
            raise ValueError(f"batch_size={hp.batch_size} exceeds the {self.num_train_items} training samples")

    def train_sampler(self, num_items: int, rank: int, world_size: int) -> EpochPermutation:
        hp = self.hparams
        if not hp.samples_per_cluster:
            return super().train_sampler(num_items, rank, world_size)
        return ClusterMateBatches(num_items, hp.batch_size, hp.samples_per_cluster, lambda: self.cluster_ids,
                                  hp.seed, rank, world_size)

    def train_dataloader(self) -> IndexBatchLoader:
        pairing = None if self.hparams.pairing == "independent" else self._paired_sources
        return self.train_loader(self.num_train_items, training_draw(self.hparams.source, tuple(self.sample_shape)),
                                 pairing)

    def _paired_sources(self, batch: dict) -> dict:
        """The batch's draws reassigned to its samples (on the host, from the host tables)."""
        index = batch["index"]
        clusters = None if self.cluster_ids is None else self.cluster_ids[index]
        return {"x0": paired_sources(self.hparams.pairing, batch["x0"], self.train_split["x"][index], clusters)}

    def _eval_loader(self) -> IndexBatchLoader:
        hp = self.hparams
        draw = source_draw(hp.source, tuple(self.sample_shape), fixed_seed=hp.seed + EVAL_SEED_OFFSET)
        return self.eval_loader(len(self.eval_split["x"]), draw)

    val_dataloader = test_dataloader = predict_dataloader = _eval_loader

    def host_tables(self, split: str) -> Tables:
        if split == "eval":
            return self.eval_split
        return self.train_split | ({"cluster": self.cluster_ids} if self.cluster_ids is not None else {})

    def gather(self, batch: dict, split: str) -> dict:
        """This batch's samples (and labels, cluster ids) from the tables on the batch's device."""
        return batch if "x" in batch else super().gather(batch, split)  # "x": already materialized
