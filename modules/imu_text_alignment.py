"""IMU-to-text alignment with soft targets (spec 002; issue 10).

An ``IMUEncoder`` and a ``TextProjection`` map a motion window into the space of a frozen sentence
encoder, where the window's activity text lives; symmetric InfoNCE against the batch's texts aligns
the two (``modules.losses.soft_targets``, target ``hard``, ``label_aware``, ``pairwise``,
``prototype`` or ``hybrid``). The text side stays frozen, so an activity training never saw is
recognized by its text alone (zero-shot, ``modules.zero_shot``).

Prototype targets (spec "How It Works"): the mean text embedding of every activity seen in training
(the datamodule's ``label_embeddings``, means over each label's descriptions) is clustered by
k-means into ``num_prototypes`` prototypes every 100 batches by
``callbacks.prototype_refresh.PrototypeRefresh`` (``label_prototypes``, rule ``kmeans``,
``loader_method="label_batches"``, ``features_method="label_features"``,
``report_method="report_label_clusters"``), and a window's target is the softmax of its label's
prototype against the batch's texts. The text encoder being frozen, the label means do not move, so
refreshes after the first find the same clusters; they are kept for the spec's monitoring lines and
for a text side that learns.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from clustering.prototypes import PrototypeMemory
from modules.losses.soft_targets import TARGET_MODES, alignment_targets, symmetric_infonce
from modules.method_base import MethodModule
from modules.networks.imu_encoder import IMUEncoder, TextProjection
from modules.zero_shot import zero_shot_metrics

PROTOTYPE_MODES = ("prototype", "hybrid")


class IMUTextAlignment(MethodModule):
    """Aligns IMU windows with activity texts.

    Args:
        num_channels, window_length, text_dim: linked from the datamodule by the CLI.
        width, depth, heads, dropout: of the ``IMUEncoder``.
        target_mode: one of ``TARGET_MODES``; soft_target_weight, prototype_weight, soft_temperature:
            of the soft targets (spec: 0.5, 0.5).
        num_prototypes: k-means prototypes of the seen label texts (spec: 5; at most the number of
            activities seen in training).
        temperature: initial InfoNCE temperature ``tau``; learn_temperature: learn ``log(1 / tau)``
            (CLIP), capped at ``max_logit_scale``.
        lr, betas, weight_decay, warmup_steps, min_lr_factor, compile, init_from, init_prefixes:
            see ``modules.method_base``.
    """

    NETWORKS = ("encoder", "projection")

    def __init__(self, num_channels: int = 9, window_length: int = 128, text_dim: int = 384, width: int = 128,
                 depth: int = 2, heads: int = 4, dropout: float = 0.1, target_mode: str = "hard",
                 soft_target_weight: float = 0.5, prototype_weight: float = 0.5, soft_temperature: float = 0.1,
                 num_prototypes: int = 5, temperature: float = 0.07, learn_temperature: bool = True,
                 max_logit_scale: float = 100.0, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.05, warmup_steps: int = 100, min_lr_factor: float = 0.01,
                 compile: bool = False, init_from: str | None = None,
                 init_prefixes: list[str] | None = None) -> None:
        super().__init__()
        if target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode must be one of {TARGET_MODES}, got {target_mode!r}")
        for name, weight in (("soft_target_weight", soft_target_weight), ("prototype_weight", prototype_weight)):
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {weight}")
        self.save_hyperparameters()
        self.encoder = IMUEncoder(num_channels, window_length, width, depth, heads, dropout)
        self.projection = TextProjection(width, text_dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)),
                                            requires_grad=learn_temperature)
        self.label_prototypes = PrototypeMemory(num_prototypes, text_dim)
        # The prototype of each label's cluster, [L, D]; derived from label_prototypes after each refresh.
        self.register_buffer("prototype_of_label", torch.zeros(0, text_dim), persistent=False)
        self.refreshes = 0
        self.latest_evaluation: dict | None = None  # what callbacks.alignment_report draws
        self.load_initial_weights()

    # ---- the label table of the datamodule, on this device ----------------------------------------
    def label_embeddings(self) -> torch.Tensor:
        return self.trainer.datamodule.label_embeddings.to(self.device)

    def seen_label_ids(self) -> torch.Tensor:
        return self.trainer.datamodule.seen_label_ids.to(self.device)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not hasattr(self.trainer.datamodule, "label_embeddings"):
            raise TypeError(f"{type(self).__name__} reads the label texts from its datamodule: pair it with "
                            "datamodules.imu_windows.IMUTextDataModule (label_embeddings, seen_label_ids)")
        seen = len(self.trainer.datamodule.seen_label_ids)
        if stage == "fit" and self.hparams.num_prototypes > seen:
            raise ValueError(f"model.num_prototypes={self.hparams.num_prototypes} exceeds the {seen} activities "
                             "seen in training; k-means needs at least as many labels as prototypes")

    # ---- networks and loss ---------------------------------------------------------------------
    def embed(self, windows: torch.Tensor) -> torch.Tensor:
        """Unit vectors in the text space ``[B, text_dim]``."""
        return self.projection(self.encoder(windows))

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.hparams.max_logit_scale)

    def targets(self, batch: dict) -> torch.Tensor:
        hp = self.hparams
        prototypes = None
        if hp.target_mode in PROTOTYPE_MODES:
            if len(self.prototype_of_label) == 0:
                raise RuntimeError(f"target_mode={hp.target_mode!r} needs label prototypes: add "
                                   "callbacks.prototype_refresh.PrototypeRefresh(memory_attr=label_prototypes, "
                                   "rule=kmeans, loader_method=label_batches, features_method=label_features, "
                                   "report_method=report_label_clusters) to the trainer's callbacks")
            prototypes = self.prototype_of_label[batch["label"]]
        return alignment_targets(hp.target_mode, batch["label"], batch["text"], prototypes, hp.soft_temperature,
                                 hp.soft_target_weight, hp.prototype_weight)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        scale = self.logit_scale()
        loss = symmetric_infonce(self.embed(batch["window"]), batch["text"], self.targets(batch), scale)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/logit_scale", scale.detach(), on_step=True, on_epoch=False)
        return loss

    # ---- label prototypes (PrototypeRefresh, rule kmeans) ------------------------------------------
    def label_batches(self) -> list[dict[str, torch.Tensor]]:
        """One batch holding the mean text embedding of every activity seen in training."""
        seen = self.trainer.datamodule.seen_label_ids
        return [{"features": self.trainer.datamodule.label_embeddings[seen], "index": torch.arange(len(seen))}]

    @staticmethod
    def label_features(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["features"], batch["index"]

    def report_label_clusters(self) -> None:
        """After a refresh: each label's prototype for the targets, and the spec's monitoring lines."""
        self.refreshes += 1
        cluster_of_label = self.assign_label_prototypes()
        seen = self.trainer.datamodule.seen_label_ids.tolist()
        names = self.trainer.datamodule.label_names
        clusters = {int(key): [names[i] for i in seen if int(cluster_of_label[i]) == int(key)]
                    for key in self.label_prototypes.keys[self.label_prototypes.counts > 0]}
        lines = [f"[PrototypeRefresh] Updated prototypes (update #{self.refreshes})",
                 f"  Total unique labels: {len(seen)}", f"  Number of clusters: {len(clusters)}"]
        lines += [f"  Cluster {key} ({len(members)} labels): {members}" for key, members in clusters.items()]
        rank_zero_info("\n".join(lines))
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("prototypes/label_clusters", columns=["update", "step", "cluster", "labels"],
                                 data=[[self.refreshes, self.global_step, key, ", ".join(members)]
                                       for key, members in clusters.items()])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["prototype_refreshes"] = self.refreshes  # the monitoring lines' update count goes on

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.refreshes = checkpoint.get("prototype_refreshes", 0)

    def assign_label_prototypes(self) -> torch.Tensor:
        """Every label's nearest prototype into ``prototype_of_label``; returns each label's cluster key."""
        cluster_of_label = self.label_prototypes.nearest(self.label_embeddings())
        self.prototype_of_label = self.label_prototypes.prototypes[self.label_prototypes.rows_of(cluster_of_label)]
        return cluster_of_label

    def on_train_start(self) -> None:
        # A resumed fit restores the memory, not this derived table (a refresh may not be due yet).
        if self.hparams.target_mode in PROTOTYPE_MODES and bool((self.label_prototypes.counts > 0).any()):
            self.assign_label_prototypes()

    # ---- evaluation ----------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Each test window's nearest label text among the test split's labels (``DIR/predictions.csv``)."""
        candidates = self.trainer.datamodule.split_labels("test").unique().to(self.device)
        scores = self.embed(batch["window"]) @ self.label_embeddings()[candidates].T
        return {"index": batch["index"], "label": batch["label"], "predicted": candidates[scores.argmax(dim=1)]}

    def evaluation_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"embedding": self.embed(batch["window"]), "label": batch["label"]}

    def evaluate(self, split: str, outputs: dict[str, torch.Tensor]) -> None:
        scores = outputs["embedding"].float() @ self.label_embeddings().float().T
        metrics = zero_shot_metrics(scores, outputs["label"], self.seen_label_ids())
        self.log_dict({f"{split}/{name}": value for name, value in metrics.items()})
        self.latest_evaluation = {"split": split, "scores": scores.cpu(), "labels": outputs["label"].cpu(),
                                  "embeddings": outputs["embedding"].float().cpu(),
                                  "label_embeddings": self.label_embeddings().float().cpu(),
                                  "label_names": list(self.trainer.datamodule.label_names)}
