"""Batches of dataset indices, drawn as whole tensors, sharded over DDP ranks.

Data that fits in memory (precomputed embeddings) needs no per-item ``Dataset`` work: each
batch is one slice of a permutation, and the rows are gathered on the device in one indexing
operation (``datamodules.index_tables``).

Determinism is what makes resume and multi-GPU runs exact. The permutation and every random
draw of an epoch come from a generator seeded by ``(seed, epoch)`` alone, so a resumed run
sees the same batches, and the global batch ``i`` is the same whatever the world size: rank
``r`` of ``W`` takes the ``r``-th contiguous part of it.

Lightning passes arbitrary iterables through untouched (no sampler injection), calls
``set_epoch`` on ``loader.sampler`` at every epoch start, and saves and restores the state of a
training iterable that has ``state_dict``/``load_state_dict`` with the fit loop's checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch


def rank_and_world(trainer) -> tuple[int, int]:
    """This process's rank and the number of processes; ``(0, 1)`` outside a trainer."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


class EpochPermutation:
    """Global order of ``num_items`` for one epoch, cut into per-rank batches.

    batch_size is per rank, as in Lightning; the global batch is ``batch_size * world_size``.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if drop_last and num_items < batch_size * world_size:
            raise ValueError(
                f"batch_size={batch_size} x {world_size} ranks exceeds the {num_items} items, "
                "so no full batch can be drawn; lower the batch size"
            )
        self.num_items, self.batch_size, self.shuffle = num_items, batch_size, shuffle
        self.drop_last, self.seed, self.rank, self.world_size = drop_last, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        # Offsetting by the epoch keeps epochs independent while staying reproducible.
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_items // (self.batch_size * self.world_size)
        return math.ceil(len(self._rank_items()) / self.batch_size)

    def _rank_items(self) -> torch.Tensor:
        # Evaluation: contiguous shards, nothing padded or repeated, so metrics count each item once.
        return torch.tensor_split(torch.arange(self.num_items), self.world_size)[self.rank]

    def rank_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        """This epoch's batches for this rank, the order drawn from ``generator``."""
        order = torch.randperm(self.num_items, generator=generator) if self.shuffle else torch.arange(self.num_items)
        return self.batches(order)

    def batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        """Cut a global ``order`` into this rank's batches."""
        if not self.drop_last:
            return list(order[self._rank_items()].split(self.batch_size))
        global_batch = self.batch_size * self.world_size
        usable = len(self) * global_batch
        local = order[:usable].view(-1, self.world_size, self.batch_size)[:, self.rank]
        return list(local.unbind(0))


# Per-epoch draws for every item: (generator, num_items) -> {name: tensor [num_items, ...]}.
ItemDraw = Callable[[torch.Generator, int], dict[str, torch.Tensor]]


def neighbour_draw(neighbors: torch.Tensor) -> ItemDraw:
    """One neighbour per item from a table ``[N, k]``, drawn uniformly (TEMI's ``EmbedNN`` pairs)."""

    def draw(generator: torch.Generator, num_items: int) -> dict[str, torch.Tensor]:
        if len(neighbors) != num_items:
            raise ValueError(f"neighbour table has {len(neighbors)} rows but the data has {num_items} items")
        choice = torch.randint(neighbors.shape[1], (num_items,), generator=generator)
        return {"pair_index": neighbors.gather(1, choice.unsqueeze(1)).squeeze(1)}

    return draw


HostFields = Callable[[dict[str, torch.Tensor]], dict]


class IndexBatchLoader:
    """Iterable of per-rank batches ``{"index": LongTensor[b], ...}``, resumable mid-epoch.

    ``sampler`` is an ``EpochPermutation`` or any object with its ``num_items``, ``epoch``,
    ``generator()``, ``set_epoch(epoch)``, ``rank_batches(generator)`` and ``len()`` (e.g.
    cluster-mate batches).

    ``draw`` adds per-item random choices (a neighbour, which views of a sentence to pair, a source
    draw): drawn for every item once per epoch, after the permutation and from the same generator,
    so item ``i``'s values depend on ``(seed, epoch, i)`` only, never on how the global batch is
    split over ranks. This costs one table of ``N`` rows per epoch on every rank.

    ``host_fields`` adds entries computed on the host from the batch's indices before the batch
    is moved to the device (e.g. how many token columns the batch needs), so that the device
    side never has to read a value back.

    ``state_dict()`` holds the epoch and the number of batches already handed out; Lightning saves
    it with every checkpoint and restores it on resume, and the next pass over that epoch then
    skips the batches already trained on (issue 9, item 2).
    """

    def __init__(self, sampler: EpochPermutation, draw: ItemDraw | None = None,
                 host_fields: HostFields | None = None) -> None:
        self.sampler = sampler
        self.batch_sampler = None  # Lightning inspects a loader's samplers like a DataLoader's
        self.draw, self.host_fields = draw, host_fields
        self._yielded = 0
        self._resume: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_yielded": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        missing = {"epoch", "batches_yielded"} - set(state_dict)
        if missing:
            raise KeyError(f"index batch loader state lacks {sorted(missing)} (found {sorted(state_dict)})")
        self._resume = dict(state_dict)

    def _start(self) -> int:
        """Batches of this epoch to skip: those a restored state says were already handed out."""
        resume, self._resume = self._resume, None
        return resume["batches_yielded"] if resume is not None and resume["epoch"] == self.sampler.epoch else 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start = self._start()
        generator = self.sampler.generator()
        batches = self.sampler.rank_batches(generator)
        drawn = self.draw(generator, self.sampler.num_items) if self.draw is not None else {}
        self._yielded = start
        for indices in batches[start:]:
            batch = {"index": indices} | {name: values[indices] for name, values in drawn.items()}
            if self.host_fields is not None:
                batch |= self.host_fields(batch)
            self._yielded += 1
            yield batch
