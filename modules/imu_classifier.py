"""Supervised baseline for the IMU-text aligner (issue 10, protocol A): the same ``IMUEncoder``
with a linear classifier over the activities, trained by cross-entropy on the same windows and
augmentations, scored by ``modules.zero_shot`` on its logits (so the two read the same metrics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.method_base import MethodModule
from modules.networks.imu_encoder import IMUEncoder
from modules.zero_shot import zero_shot_metrics


class SupervisedIMUClassifier(MethodModule):
    """Args: num_channels, window_length, num_labels (linked from the datamodule); the encoder's
    width, depth, heads, dropout; label_smoothing; and ``modules.method_base``'s optimizer names."""

    NETWORKS = ("encoder",)

    def __init__(self, num_channels: int = 9, window_length: int = 128, num_labels: int = 6, width: int = 128,
                 depth: int = 2, heads: int = 4, dropout: float = 0.1, label_smoothing: float = 0.0,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.05,
                 warmup_steps: int = 100, min_lr_factor: float = 0.01, compile: bool = False,
                 init_from: str | None = None, init_prefixes: list[str] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = IMUEncoder(num_channels, window_length, width, depth, heads, dropout)
        self.classifier = nn.Linear(width, num_labels)
        self.load_initial_weights()

    def logits(self, windows: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(windows))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.logits(batch["window"]), batch["label"],
                               label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def evaluation_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"scores": self.logits(batch["window"]), "label": batch["label"]}

    def evaluate(self, split: str, outputs: dict[str, torch.Tensor]) -> None:
        seen = self.trainer.datamodule.seen_label_ids.to(self.device)
        metrics = zero_shot_metrics(outputs["scores"].float(), outputs["label"], seen)
        self.log_dict({f"{split}/{name}": value for name, value in metrics.items()})
