"""Refresh a module's ``PrototypeMemory`` every N training steps or epochs (issue 9, item 3).

At fit start and then every ``every_n_steps`` steps (before the step's batch) or every
``every_n_epochs`` epochs (at the epoch's start), the callback runs the module's feature method
over a loader, in ``torch.no_grad()``, in eval mode (every submodule's mode restored after),
under the trainer's precision context and with the global random state left as it was, and
refreshes the memory by one of ``clustering.prototypes``' rules:

* ``means``: ``features_method(batch) -> (features [B, D], keys [B])``, the per-key means,
  summed over ranks (optionally an EMA with ``momentum``, optionally L2-normalized rows);
* ``kmeans``: ``features_method(batch) -> (features [B, D], dataset indices [B])``, faiss k-means
  on rank 0 over a bounded sample of the items, broadcast.

The loader is ``loader_method()`` of the module when named, else the datamodule's
``training_items_dataloader()`` (every training item once, without the training draws; see
``datamodules.index_tables``), else a fresh ``train_dataloader()``, never the loader the fit is
iterating. The step or epoch of
the latest refresh is checkpointed, so a resumed run refreshes where the uninterrupted one does;
the memory itself is in the module's ``state_dict``. After each refresh, ``report_method()`` of the
module (when named) is called on every rank, e.g. to log what the prototypes hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from clustering.kmeans import MAX_POINTS_PER_CENTROID
from clustering.prototypes import PrototypeMemory
from datamodules.index_tables import resolve_seed


@contextmanager
def feature_pass(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
    """Features as the model computes them at evaluation, without touching training state:
    no gradients, eval mode (each submodule's own mode restored, so frozen parts stay frozen),
    the precision plugin's forward context (autocast under ``*-mixed``), global RNG restored."""
    modes = [(module, module.training) for module in pl_module.modules()]
    pl_module.eval()
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []  # the CPU generator is always kept
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context():
            yield
    finally:
        for module, training in modes:
            module.training = training


def memory_of(pl_module: L.LightningModule, attribute: str) -> PrototypeMemory:
    memory = getattr(pl_module, attribute, None)
    if not isinstance(memory, PrototypeMemory):
        raise TypeError(f"{type(pl_module).__name__}.{attribute} must be a clustering.prototypes.PrototypeMemory, "
                        f"got {type(memory).__name__}")
    return memory


class PrototypeRefresh(Callback):
    """Refresh ``pl_module.<memory_attr>`` from ``pl_module.<features_method>(batch)``.

    Args:
        memory_attr: the module attribute holding the ``PrototypeMemory``.
        features_method: module method ``batch -> (features [B, D], keys or dataset indices [B])``.
        rule: ``"means"`` (per-key means) or ``"kmeans"``.
        every_n_steps, every_n_epochs: the refresh period; exactly one of the two is positive.
        momentum, normalize: of the ``means`` rule.
        loader_method: module method returning the batches to read; default the datamodule's
            ``training_items_dataloader()`` (else its ``train_dataloader()``).
        seed, niter, max_points_per_centroid: of the ``kmeans`` rule; ``seed=None`` takes the
            global seed of ``seed_everything`` (else 0).
        report_method: module method called without arguments after every refresh, on every rank.
    """

    def __init__(self, memory_attr: str = "prototypes", features_method: str = "prototype_features",
                 rule: Literal["means", "kmeans"] = "means", every_n_steps: int = 0, every_n_epochs: int = 0,
                 momentum: float = 0.0, normalize: bool = False, loader_method: str | None = None,
                 seed: int | None = None, niter: int = 25,
                 max_points_per_centroid: int = MAX_POINTS_PER_CENTROID, report_method: str | None = None) -> None:
        if rule not in ("means", "kmeans"):
            raise ValueError(f"PrototypeRefresh rule must be 'means' or 'kmeans', got {rule!r}")
        if (every_n_steps > 0) == (every_n_epochs > 0) or min(every_n_steps, every_n_epochs) < 0:
            raise ValueError("PrototypeRefresh needs exactly one of every_n_steps and every_n_epochs positive, "
                             f"got every_n_steps={every_n_steps}, every_n_epochs={every_n_epochs}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"PrototypeRefresh momentum must lie in [0, 1), got {momentum}")
        self.memory_attr, self.features_method, self.rule = memory_attr, features_method, rule
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.momentum, self.normalize, self.loader_method = momentum, normalize, loader_method
        self.seed, self.niter, self.max_points_per_centroid = seed, niter, max_points_per_centroid
        self.report_method = report_method
        self.last_refresh = -1  # the step (or epoch) of the latest refresh

    @property
    def state_key(self) -> str:
        return self._generate_state_key(memory_attr=self.memory_attr)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        memory_of(pl_module, self.memory_attr)
        for name in filter(None, (self.features_method, self.loader_method, self.report_method)):
            if not callable(getattr(pl_module, name, None)):
                raise TypeError(f"PrototypeRefresh needs the method {type(pl_module).__name__}.{name}()")
        if self.loader_method is None and trainer.datamodule is None:
            raise TypeError("PrototypeRefresh reads the datamodule's training items; without a datamodule, "
                            "name a module method returning the batches with loader_method=")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and self._due(trainer.current_epoch, self.every_n_epochs):
            self.refresh(trainer, pl_module)
            self.last_refresh = trainer.current_epoch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.every_n_steps and self._due(trainer.global_step, self.every_n_steps):
            self.refresh(trainer, pl_module)
            self.last_refresh = trainer.global_step

    def _due(self, count: int, every: int) -> bool:
        return count % every == 0 and count != self.last_refresh

    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One refresh by the configured rule; a collective, every rank calls it."""
        memory = memory_of(pl_module, self.memory_attr)
        with feature_pass(trainer, pl_module):
            if self.rule == "means":
                self._refresh_means(memory, self._features(trainer, pl_module))
            else:
                features, indices = (torch.cat(part) for part in zip(*self._features(trainer, pl_module)))
                memory.refresh_kmeans(features.flatten(1), indices, seed=resolve_seed(self.seed), niter=self.niter,
                                      max_points_per_centroid=self.max_points_per_centroid)
        if self.report_method:
            getattr(pl_module, self.report_method)()

    def _refresh_means(self, memory: PrototypeMemory, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        sums = torch.zeros(memory.prototypes.shape, device=memory.prototypes.device)
        counts = torch.zeros(memory.num_prototypes, dtype=torch.long, device=memory.counts.device)
        for features, keys in batches:
            batch_sums, batch_counts = memory.key_sums(features.flatten(1), keys)
            sums += batch_sums
            counts += batch_counts
        memory.update_means(sums, counts, momentum=self.momentum, normalize=self.normalize)

    def _features(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.loader_method:
            loader = getattr(pl_module, self.loader_method)()
        else:
            datamodule = trainer.datamodule
            loader = getattr(datamodule, "training_items_dataloader", datamodule.train_dataloader)()
        compute = getattr(pl_module, self.features_method)
        for batch in loader:
            yield compute(trainer.strategy.batch_to_device(batch))

    def state_dict(self) -> dict[str, Any]:
        return {"last_refresh": self.last_refresh}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_refresh = state_dict["last_refresh"]
