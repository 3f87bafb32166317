"""Random-number-generator state in checkpoints, so a resumed run draws what the uninterrupted
run would have drawn (dropout masks, random initializations made mid-run), on every rank."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn


class RandomState(Callback):
    """Saves and restores the Python, NumPy, torch (and CUDA) generators of every rank (issue 9, item 7).

    At fit start, rank ``r > 0`` reseeds its generators with ``torch.initial_seed() + r``, so
    per-step draws such as dropout masks differ between ranks; rank 0 keeps its state, so a
    one-process run draws what it drew before. A checkpoint restore comes later and overrides this.
    ``state_dict`` gathers the states of all ranks (Lightning calls it on every rank when saving;
    rank 0 writes the file); on load each rank keeps its own and sets it at ``on_train_start``,
    after the sanity check, whose draws the uninterrupted run did not make at that point. A
    checkpoint saved with another number of ranks leaves the seeded generators in place, with a
    warning.

    Data order does not depend on this: the datamodules seed it from ``(seed, epoch)``.
    """

    def __init__(self) -> None:
        self.restored: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.global_rank > 0:
            seed_generators(torch.initial_seed() + trainer.global_rank)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.restored is not None:
            set_generator_state(self.restored)
            self.restored = None

    def state_dict(self) -> dict[str, Any]:
        own = generator_state()
        if not _distributed():
            return {"ranks": [own]}
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, own)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("ranks", [state_dict])  # older checkpoints hold rank 0's state alone
        world_size, rank = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
        if len(states) != world_size:
            rank_zero_warn(f"RandomState: the checkpoint holds the generators of {len(states)} rank(s), this run "
                           f"has {world_size}; the generators stay as seeded, so random draws after the resume "
                           "differ from those of an uninterrupted run")
            return
        self.restored = states[rank]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def seed_generators(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator_state() -> dict[str, Any]:
    """The generators' states as plain bytes and numbers, which ``all_gather_object`` can carry."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "position": position, "has_gauss": has_gauss,
                  "cached_gaussian": cached},
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [device_state.numpy().tobytes() for device_state in torch.cuda.get_rng_state_all()]
    return state


def set_generator_state(state: dict[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(device_state) for device_state in state["cuda"]])


def _byte_tensor(state: bytes | torch.Tensor) -> torch.Tensor:
    """A generator state as ``torch.set_rng_state`` takes it; older checkpoints stored the tensor itself."""
    return state if isinstance(state, torch.Tensor) else torch.frombuffer(bytearray(state), dtype=torch.uint8)
