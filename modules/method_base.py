"""What every method shares (issue 9, items 1, 4 and 10): the optimizer and its schedule, evaluation
outputs collected per split and gathered over ranks, weights started from a checkpoint, and an
opt-in ``torch.compile`` of the networks.

A method subclasses ``MethodModule`` and declares, in its own ``__init__`` (with its own defaults)
and saved by ``save_hyperparameters``, the hyperparameters the base reads:

* ``lr``, ``betas``, ``weight_decay``: AdamW over ``modules.optim.decay_groups``;
* ``warmup_steps``, ``min_lr_factor``: linear warmup, then cosine down to ``min_lr_factor * lr``
  at the last step. Warmup takes at most half of the run (``min(warmup, total // 2)``); a method
  that counts warmup otherwise (TEMI, in epochs) overrides ``requested_warmup_steps``;
* ``compile``: ``torch.compile`` the modules named in ``NETWORKS`` in ``setup``, in place
  (``nn.Module.compile``), so checkpoints keep the plain parameter names (not in ``configure_model``,
  whose override makes ``EMAWeightAveraging`` warn about sharded layers at every fit);
* ``init_from``, ``init_prefixes``: see ``load_initial_weights``, which the subclass calls at
  the end of its ``__init__``.

Evaluation: ``evaluation_outputs(batch)`` returns a dict of row tensors per batch; at the end of
the split they are concatenated, gathered from every rank in rank order
(``modules.distributed.gather_outputs``, also when a rank's shard is empty) and handed to
``evaluate(split, outputs)``, which sees the whole evaluation set on every rank and so logs
without a reduction.

Under DDP, BatchNorm statistics stay per rank unless the trainer converts them:
``--trainer.sync_batchnorm true`` (Lightning's ``SyncBatchNorm`` conversion) synchronizes them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from modules.distributed import gather_outputs
from modules.optim import decay_groups, warmup_cosine_scheduler

# Top-level entries Lightning writes into every checkpoint; anything else but a precision plugin's
# state is a datamodule's ``state_dict`` (stored under the datamodule's class name).
LIGHTNING_CHECKPOINT_KEYS = frozenset({
    "epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops", "callbacks",
    "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters", "hparams_type",
    "datamodule_hparams_name", "datamodule_hyper_parameters", "datamodule_hparams_type",
    # WeightAveraging (EMAWeightAveraging) keeps the live weights and its own state beside the averaged
    # state_dict it saves.
    "current_model_state", "averaging_state",
})


class MethodModule(L.LightningModule):
    """Base of the methods; see the module docstring for the hyperparameters it reads."""

    NETWORKS: tuple[str, ...] = ()  # attribute names of the networks ``compile`` applies to
    FUSED_OPTIMIZER = False  # fused AdamW (one kernel per step; needed to skip steps on the device)

    def __init__(self) -> None:
        super().__init__()
        self._collected: dict[str, list[dict[str, torch.Tensor]]] = defaultdict(list)
        self._init_data_state: tuple[str, dict] | None = None  # (class name, state) from init_from
        self.total_steps = 1  # set by configure_optimizers

    # ---- optimization ----------------------------------------------------------------------
    def peak_learning_rate(self) -> float:
        return self.hparams.lr

    def requested_warmup_steps(self) -> int:
        return self.hparams.warmup_steps

    def parameter_groups(self) -> list[dict]:
        """AdamW's parameter groups; a group may set its own peak ``lr``, which the schedule then scales."""
        return decay_groups(self, self.hparams.weight_decay)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.peak_learning_rate(),
                                      betas=tuple(hp.betas), fused=self.FUSED_OPTIMIZER or None)
        self.total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.requested_warmup_steps(), self.total_steps // 2)
        schedule = warmup_cosine_scheduler(optimizer, warmup, self.total_steps, hp.min_lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


    # ---- evaluation ------------------------------------------------------------------------
    def evaluation_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Rows ``[B, ...]`` per name that ``evaluate`` needs from one evaluation batch."""
        raise NotImplementedError

    def evaluate(self, split: str, outputs: dict[str, torch.Tensor]) -> None:
        """Score and log the whole evaluation set of ``split`` (identical on every rank)."""
        raise NotImplementedError

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._collected["val"].append(self.evaluation_outputs(batch))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._collected["test"].append(self.evaluation_outputs(batch))

    def on_validation_epoch_end(self) -> None:
        self._evaluate_collected("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate_collected("test")

    def _evaluate_collected(self, split: str) -> None:
        outputs = gather_outputs(self, self._collected.pop(split, []))
        if outputs:
            self.evaluate(split, outputs)

    # ---- starting from a checkpoint --------------------------------------------------------
    def load_initial_weights(self) -> None:
        """``init_from``: start from a checkpoint's weights (e.g. P2 from the end of P1).

        Only the checkpoint's entries whose names start with one of ``init_prefixes`` are read
        (all of them without prefixes), so a model with new parts (a decoder) starts from an
        encoder-only checkpoint: its parameters that the checkpoint lacks keep their fresh
        initialization and are listed in a warning. Read entries this model does not have, or
        has with another shape, are an error. The datamodule's state (the tokenizer whose ids the
        weights read) is carried too, whatever the datamodule's class is called, and handed to
        the datamodule in ``setup("fit")``.
        """
        path = self.hparams.init_from
        if path is None:
            return
        checkpoint = read_checkpoint(path)
        self.upgrade_state_dict(checkpoint["state_dict"])
        prefixes = tuple(self.hparams.init_prefixes or ("",))
        selected = {name: value for name, value in checkpoint["state_dict"].items() if name.startswith(prefixes)}
        if not selected:
            raise ValueError(f"init_from={path}: no weights start with {list(prefixes)}; the checkpoint "
                             f"holds {sorted({name.split('.')[0] for name in checkpoint['state_dict']})}")
        own = self.state_dict()
        unexpected = sorted(set(selected) - set(own))
        mismatched = sorted(name for name in set(selected) & set(own) if selected[name].shape != own[name].shape)
        if unexpected or mismatched:
            raise ValueError(f"init_from={path} does not match this model's architecture: unexpected weights "
                             f"{unexpected}, weights of another shape {mismatched}; choose the parts to read "
                             "with init_prefixes")
        missing = self.load_state_dict(selected, strict=False).missing_keys
        if missing:
            rank_zero_warn(f"init_from={path}: {len(missing)} weights are not in the checkpoint and start "
                           f"fresh: {missing}")
        self._init_data_state = _datamodule_state(checkpoint, path)

    def upgrade_state_dict(self, state: dict) -> None:
        """Brings, in place, the weights of a checkpoint saved by an earlier layout of this method to its present
        names; called on every checkpoint read, by ``init_from`` and by ``on_load_checkpoint``. None here."""

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.upgrade_state_dict(checkpoint["state_dict"])

    def setup(self, stage: str) -> None:
        if self.hparams.compile:
            for name in self.NETWORKS:
                getattr(self, name).compile()  # idempotent: compiling again replaces the wrapper
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if stage == "fit" and datamodule is not None and self._init_data_state is not None:
            datamodule.load_state_dict(self._init_data_state[1])


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint's contents on the CPU; a ValueError naming the file otherwise."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(f"cannot read the checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def _datamodule_state(checkpoint: dict, path: str) -> tuple[str, dict] | None:
    """``(class name, state)`` of the datamodule saved in ``checkpoint``, or None without one."""
    states = [(name, value) for name, value in checkpoint.items()
              if name not in LIGHTNING_CHECKPOINT_KEYS and not name.endswith("Precision") and isinstance(value, dict)]
    if len(states) > 1:
        raise ValueError(f"init_from={path} holds several datamodule states {[name for name, _ in states]}; "
                         "expected one")
    return states[0] if states else None

