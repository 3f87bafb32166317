"""Random-number-generator state in checkpoints, so a resumed run draws what the uninterrupted
run would have drawn (dropout masks, random initializations made mid-run)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RandomState(Callback):
    """Saves and restores the Python, NumPy, torch (and CUDA) generators of rank 0.

    Data order does not depend on this: the datamodules seed it from ``(seed, epoch)``.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.copy()), "position": position,
                      "has_gauss": has_gauss, "cached_gaussian": cached},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        python_state = state_dict["python"]
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        numpy_state = state_dict["numpy"]
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy(), numpy_state["position"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
