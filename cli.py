"""Command line for every method: ``python cli.py fit --config configs/temi.yaml``.

Any LightningModule / LightningDataModule pair runs from YAML (subclass mode); several
``--config`` files compose, later ones overriding earlier ones (a CPU profile on top of a
method config). Every run leaves ``DIR/checkpoints/last.ckpt`` (plus the best checkpoint),
``DIR/config.yaml`` and ``DIR/metrics.json`` in ``--trainer.default_root_dir DIR``, and
``predict`` writes ``DIR/predictions.csv``. Resume with ``--ckpt_path last`` and the same directory.

W&B logs offline unless ``WANDB_MODE=online`` (or ``disabled``) is set in the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

# W&B must never wait on a network it may not have; going online is the user's explicit choice.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from callbacks.config_logging import LogConfig  # noqa: E402
from callbacks.last_checkpoint import LastCheckpoint  # noqa: E402
from callbacks.metrics_file import MetricsFile  # noqa: E402
from callbacks.prediction_writer import PredictionWriter  # noqa: E402
from callbacks.random_state import RandomState  # noqa: E402

DEFAULTS = Path(__file__).resolve().parent / "configs" / "defaults.yaml"

# Values that follow from the data, linked from the datamodule to the model when both have them.
# A datamodule must not expose one of these names unless its model takes it: jsonargparse would pass
# it on as an unexpected keyword, which also lands in checkpoints and breaks `--ckpt_path` loading.
DATA_LINKS = ("input_dim", "num_clusters", "num_classes", "batch_size", "vocab_size", "max_length")


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


if __name__ == "__main__":
    main()
