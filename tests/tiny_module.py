"""The smallest LightningModule that trains and validates, for tests of callbacks."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset


class TinyModule(L.LightningModule):
    """One linear layer on 4 random points; subclasses add what their callback reads."""

    def __init__(self, width: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(2, width)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)


class TinyData(L.LightningDataModule):
    """Data for ``TinyModule`` that exposes ``batch_size``, a name the CLI links to models that take it."""

    def __init__(self, batch_size: int = 2) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=self.batch_size)


class RandomDraws(TinyModule):
    """Draws one number from torch's global generator per training step (as dropout does) and writes
    this run's draws to ``default_root_dir/draws.rank{r}.json`` at the end of fit."""

    def __init__(self, width: int = 1) -> None:
        super().__init__(width)
        self.draws: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.draws.append(torch.rand(()).item())
        return super().training_step(batch, batch_idx)

    def on_train_end(self) -> None:
        path = Path(self.trainer.default_root_dir) / f"draws.rank{self.global_rank}.json"
        path.write_text(json.dumps(self.draws))


class SignalAtStep(Callback):
    """Sends this process ``signal_name`` after training step ``step``, as a scheduler's preemption
    (SIGTERM) or a Ctrl-C (SIGINT) would, and reports it on stdout."""

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step, self.signal_name = step, signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            print(f"sending {self.signal_name} at step {self.step}", flush=True)
            # raise_signal runs the handler before it returns: the interrupt comes from this step
            signal.raise_signal(getattr(signal, self.signal_name))


class GeneratorFreeData(L.LightningDataModule):
    """Fixed points in loaders with their own generators, so that the data draws nothing from the
    global generators (a DataLoader's iterator otherwise takes its base seed from torch's)."""

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def _loader(self) -> DataLoader:
        points = torch.linspace(-1, 1, 8).view(4, 2)
        return DataLoader(TensorDataset(points), batch_size=2, generator=torch.Generator().manual_seed(0))
