"""Command line for every method: ``python cli.py fit --config configs/temi.yaml``.

Any LightningModule / LightningDataModule pair runs from YAML (subclass mode); several
``--config`` files compose, later ones overriding earlier ones (a CPU profile on top of a
method config). Every run leaves ``DIR/checkpoints/last.ckpt`` (plus the best checkpoint),
``DIR/config.yaml`` and ``DIR/metrics.json`` in ``--trainer.default_root_dir DIR``, and
``predict`` writes ``DIR/predictions.csv``. Resume with ``--ckpt_path last`` and the same directory.

W&B logs offline unless ``WANDB_MODE=online`` (or ``disabled``) is set in the environment.
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
import sys
from pathlib import Path

# W&B must never wait on a network it may not have; going online is the user's explicit choice.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.plugins.io import CheckpointIO  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

from callbacks.config_logging import LogConfig  # noqa: E402
from callbacks.last_checkpoint import AtomicCheckpointIO, LastCheckpoint  # noqa: E402
from callbacks.metrics_file import MetricsFile  # noqa: E402
from callbacks.prediction_writer import PredictionWriter  # noqa: E402
from callbacks.progress import EpochMetricsOnEveryRank, ValidationLines  # noqa: E402
from callbacks.random_state import RandomState  # noqa: E402

DEFAULTS = Path(__file__).resolve().parent / "configs" / "defaults.yaml"

# Values that follow from the data, linked from the datamodule to the model when both have them.
DATA_LINKS = ("input_dim", "num_clusters", "num_classes", "batch_size", "vocab_size", "max_length", "sample_shape",
              "num_channels", "window_length", "text_dim", "num_labels", "embedding_dim", "num_attributes")


class ProtoCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")  # the best, by checkpoint.monitor
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(MetricsFile, "metrics_file")
        parser.add_lightning_class_args(RandomState, "random_state")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        for name in DATA_LINKS:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config.trainer.default_root_dir or os.getcwd())
        for checkpoint in (config.checkpoint, config.last_checkpoint):
            if checkpoint.dirpath is None:
                checkpoint.dirpath = str(root / "checkpoints")
        for logger in _as_list(config.trainer.logger):
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "save_dir" in init_args and init_args.save_dir in (None, "."):
                init_args.save_dir = str(root)
                root.mkdir(parents=True, exist_ok=True)
        _drop_links_the_model_does_not_take(config.model)

    def instantiate_trainer(self, **kwargs):
        """The trainer as configured, plus what every run gets: epoch metrics reduced on every rank
        before any progress bar reads them, progress as a TQDM bar on a terminal and one line per
        validation elsewhere (when the bar is not switched off), and atomic checkpoint files."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = [EpochMetricsOnEveryRank(), *_as_list(config.get("callbacks"))]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            terminal = sys.stdout.isatty()
            callbacks.append(TQDMProgressBar() if terminal else ValidationLines())
            kwargs.setdefault("enable_progress_bar", terminal)
        plugins = _as_list(config.get("plugins"))
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)


def _drop_links_the_model_does_not_take(model) -> None:
    """Lightning stores every applied link in a model's saved hyperparameters, also the links its
    class has no parameter for (a datamodule exposes ``batch_size``, the model does not take it);
    ``--ckpt_path`` reads them back as keywords the class would refuse. Only those are dropped: any
    other unknown keyword still fails."""
    extra = getattr(model, "dict_kwargs", None)
    if not extra or not isinstance(model.class_path, str):
        return
    module_name, _, class_name = model.class_path.rpartition(".")
    parameters = inspect.signature(getattr(importlib.import_module(module_name), class_name)).parameters
    for name in DATA_LINKS:
        if name in extra and name not in parameters:
            del extra[name]


def _as_list(value) -> list:
    if value is None or isinstance(value, bool):
        return []
    return value if isinstance(value, list) else [value]


def main(args: list[str] | None = None) -> ProtoCLI:
    default_configs = {"default_config_files": [str(DEFAULTS)]}
    return ProtoCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LogConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={stage: default_configs for stage in ("fit", "validate", "test", "predict")},
        args=args,
    )


def _close_process_group() -> None:
    """Lightning destroys an NCCL process group at exit but leaves a gloo one to interpreter
    teardown, where its threads can abort a finished run ("terminate called without an active
    exception"); closing it here joins them first."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except SIGTERMException:
        # Lightning ends a SIGTERM-ed fit (after its checkpoint) with exit status 0; a preempted run
        # must not read as finished to the next command or the scheduler: 128 + signal, as the shell does.
        sys.exit(128 + signal.SIGTERM)
    finally:
        _close_process_group()
