"""TEMI deep clustering on precomputed embeddings (spec 003; Adaloglou et al., BMVC 2023).

A student of ``H`` clustering heads learns from an EMA teacher of itself: for an item ``x`` and
a neighbour ``x'`` drawn from its kNN, each head minimizes the teacher-weighted, symmetrized
``beta``-PMI loss of ``modules.losses.temi``. The head with the lowest epoch-mean loss is
selected, and the teacher's selected head is what gets evaluated.

Defaults follow the official code (``train_main.py`` with the README's TEMI command); the
spec's variants are options: ``pair_loss="spec"``, ``entropy_weight=5.0``, ``heads="spec"``
(``configs/temi_spec.yaml``).
"""

from __future__ import annotations

import copy
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from modules.ema import ema_update
from modules.losses.temi import PAIR_LOSSES, batch_entropy_regularizer, temi_head_losses, updated_marginal
from modules.metrics import ClusterOccupancy, label_metrics
from modules.networks.cluster_heads import SpecMLPHeads, TEMIHeads
from modules.optim import cosine_ramp, decay_groups, linear_ramp, warmup_cosine_scheduler


def build_heads(kind: str, input_dim: int, num_clusters: int, num_heads: int, hidden_dim: int,
                bottleneck_dim: int, dropout: float, train_last_norm: bool) -> nn.Module:
    if kind == "temi":
        return TEMIHeads(input_dim, num_clusters, num_heads, hidden_dim, bottleneck_dim, train_last_norm)
    if kind == "spec":
        return SpecMLPHeads(input_dim, num_clusters, num_heads, hidden_dim, dropout)
    raise ValueError(f"heads must be 'temi' or 'spec', got {kind!r}")


class TEMIClustering(L.LightningModule):
    """TEMI clustering heads on embeddings.

    Args:
        input_dim, num_clusters, num_classes, batch_size: linked from the datamodule by the CLI.
        heads: ``"temi"`` (official heads) or ``"spec"`` (spec's BatchNorm/Dropout MLP heads).
        pair_loss: ``"official"`` (``beta_pmi``) or ``"spec"`` (``spec_beta_mi``).
        entropy_weight: weight of the spec's batch-marginal entropy term (0 = off, as official).
        marginal_momentum: EMA momentum of ``p(k)``, the teacher's cluster marginal.
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: teacher softmax
            temperature, ramped linearly from the warmup value (official: 0.1 throughout).
        teacher_momentum, final_teacher_momentum: EMA momentum, cosine-ramped over training.
        lr, min_lr: per 256 items of global batch (linear scaling rule); linear warmup over
            ``warmup_epochs``, then cosine to ``min_lr``.
        freeze_last_layer_epochs: epochs during which the last layer gets no update.
        per_head_metrics: also log every head's metrics, not only the selected head's.
        max_nonfinite_steps: a NaN/inf loss skips its step; this many in a row stop the run.
    """

    def __init__(
        self,
        input_dim: int,
        num_clusters: int,
        num_classes: int | None = None,
        batch_size: int = 256,
        heads: Literal["temi", "spec"] = "temi",
        num_heads: int = 16,
        hidden_dim: int = 512,
        bottleneck_dim: int = 256,
        dropout: float = 0.1,
        train_last_norm: bool = True,
        pair_loss: Literal["official", "spec"] = "official",
        beta: float = 0.6,
        entropy_weight: float = 0.0,
        marginal_momentum: float = 0.9,
        student_temp: float = 0.1,
        teacher_temp: float = 0.1,
        warmup_teacher_temp: float = 0.1,
        warmup_teacher_temp_epochs: int = 0,
        teacher_momentum: float = 0.996,
        final_teacher_momentum: float = 0.996,
        lr: float = 1e-4,
        min_lr: float = 1e-4,
        weight_decay: float = 1e-4,
        warmup_epochs: int = 20,
        freeze_last_layer_epochs: int = 1,
        per_head_metrics: bool = True,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if pair_loss not in PAIR_LOSSES:
            raise ValueError(f"pair_loss must be one of {sorted(PAIR_LOSSES)}, got {pair_loss!r}")
        self.student = build_heads(heads, input_dim, num_clusters, num_heads, hidden_dim, bottleneck_dim,
                                   dropout, train_last_norm)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("marginal", torch.full((num_heads, num_clusters), 1.0 / num_clusters))
        self.register_buffer("best_head", torch.tensor(0))
        self.register_buffer("epoch_head_loss", torch.zeros(num_heads))
        self.register_buffer("epoch_steps", torch.tensor(0))
        self.register_buffer("nonfinite_streak", torch.tensor(0))
        self.register_buffer("nonfinite_total", torch.tensor(0))
        self.occupancy = ClusterOccupancy(num_clusters)
        scored_heads = num_heads if per_head_metrics else 1
        self.head_metrics = nn.ModuleList(
            [label_metrics(num_clusters, num_classes or num_clusters) for _ in range(scored_heads)]
        )
        self._step_applied = False
        self._total_steps = 1

    # ---- schedules ------------------------------------------------------------------------
    def teacher_temperature(self) -> float:
        hp = self.hparams
        return linear_ramp(self.current_epoch, hp.warmup_teacher_temp_epochs, hp.warmup_teacher_temp, hp.teacher_temp)

    def teacher_momentum(self) -> float:
        hp = self.hparams
        return cosine_ramp(self.global_step, self._total_steps, hp.teacher_momentum, hp.final_teacher_momentum)

    # ---- training -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> TEMIClustering:
        super().train(mode)
        # The teacher only gives targets: no dropout, batch norm from its EMA'd running statistics.
        self.teacher.eval()
        return self

    def view_log_probs(self, net: nn.Module, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """Log-probabilities ``[2, H, B, K]`` of both views stacked in ``x = [x; x']``."""
        logits = rearrange(net(x), "h (v b) k -> v h b k", v=2) / temperature
        # Same as log_softmax; on CPU about 3x faster for the short rows of K clusters.
        return logits - logits.logsumexp(dim=-1, keepdim=True)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        hp = self.hparams
        x = torch.cat([batch["x"], batch["x_pair"]])
        student = self.view_log_probs(self.student, x, hp.student_temp)
        with torch.no_grad():
            teacher = self.view_log_probs(self.teacher, x, self.teacher_temperature())
            batch_marginal = self._over_ranks(teacher.exp().mean(dim=(0, 2)), "mean")
            marginal = updated_marginal(self.marginal, batch_marginal, hp.marginal_momentum)
        head_losses = temi_head_losses(student, teacher, marginal.log(), hp.beta, PAIR_LOSSES[hp.pair_loss])
        if hp.entropy_weight:
            head_losses = head_losses + hp.entropy_weight * batch_entropy_regularizer(student)
        loss = head_losses.mean()
        self._step_applied = self._loss_is_finite(loss)
        if not self._step_applied:
            return None
        self.marginal.copy_(marginal)
        self.epoch_head_loss += head_losses.detach()
        self.epoch_steps += 1
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def _over_ranks(self, value: torch.Tensor, reduce_op: str) -> torch.Tensor:
        """All-reduce across DDP ranks (``"mean"`` or ``"sum"``); identity without a trainer."""
        return self.trainer.strategy.reduce(value, reduce_op=reduce_op) if self._trainer is not None else value

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        """Agree over all ranks whether to take the step; count and bound non-finite losses."""
        bad = self._over_ranks((~torch.isfinite(loss.detach())).float(), "sum")
        if bad.item() == 0:
            self.nonfinite_streak.zero_()
            return True
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        self.log("train/nonfinite_steps", self.nonfinite_total.float(), on_step=True, on_epoch=False)
        if self.nonfinite_streak.item() >= self.hparams.max_nonfinite_steps:
            raise FloatingPointError(
                f"the TEMI loss was NaN or inf for {self.nonfinite_streak.item()} steps in a row "
                f"(epoch {self.current_epoch}, step {self.global_step}); stopping. Lower model.lr, "
                "raise model.student_temp, or check the embeddings; the last checkpoint is kept."
            )
        return False

    def on_after_backward(self) -> None:
        # Official ``cancel_gradients_last_layer``: the last layer stays fixed at first.
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for param in self.student.last_layer.parameters():
                param.grad = None

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self._step_applied:
            ema_update(self.teacher, self.student, self.teacher_momentum())

    def on_train_epoch_start(self) -> None:
        self.epoch_head_loss.zero_()
        self.epoch_steps.zero_()

    def on_train_epoch_end(self) -> None:
        mean_loss = self._select_best_head()
        # Logged once per epoch: each self.log costs ~0.7 ms, a tenth of a CPU step's overhead.
        self.log("train/teacher_temp", self.teacher_temperature())
        self.log("train/best_head", self.best_head.float())
        self.log("train/best_head_loss", mean_loss.min())

    def _select_best_head(self) -> torch.Tensor:
        """Best head = lowest epoch-mean training loss over all ranks (official ``set_losses``).

        Called on every rank (it reduces); a no-op before the first training step of an epoch.
        """
        mean_loss = self._over_ranks(self.epoch_head_loss / self.epoch_steps.clamp_min(1), "mean")
        if self.epoch_steps.item() > 0:
            self.best_head.fill_(int(mean_loss.argmin()))
        return mean_loss

    def configure_optimizers(self):
        hp = self.hparams
        trainer = self.trainer
        global_batch = hp.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        base_lr = hp.lr * global_batch / 256
        optimizer = torch.optim.AdamW(decay_groups(self.student, hp.weight_decay), lr=base_lr, fused=True)
        total_steps = self._total_steps = int(trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, trainer.num_training_batches // trainer.accumulate_grad_batches)
        scheduler = warmup_cosine_scheduler(optimizer, hp.warmup_epochs * steps_per_epoch, total_steps,
                                            final_factor=hp.min_lr / hp.lr)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ---- evaluation -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster probabilities ``[B, K]`` of the teacher's selected head."""
        logits = self.teacher(x)[self.best_head]
        return F.softmax(logits / self.hparams.teacher_temp, dim=-1)

    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._select_best_head()

    def _update_metrics(self, batch: dict) -> None:
        preds = self.teacher(batch["x"]).argmax(dim=-1)  # [H, B]
        self.occupancy.update(preds[self.best_head])
        if "y" not in batch:
            return
        if self.hparams.per_head_metrics:
            for metrics, head_preds in zip(self.head_metrics, preds, strict=True):
                metrics.update(head_preds, batch["y"])
        else:
            self.head_metrics[0].update(preds[self.best_head], batch["y"])

    def _log_metrics(self, prefix: str) -> None:
        scores = {f"{prefix}/{name}": value for name, value in self.occupancy.compute().items()}
        self.occupancy.reset()
        if self.head_metrics[0]["acc"].update_count > 0:  # labels were seen
            per_head = [metrics.compute() for metrics in self.head_metrics]
            selected = per_head[int(self.best_head)] if self.hparams.per_head_metrics else per_head[0]
            scores.update({f"{prefix}/{name}": value for name, value in selected.items()})
            if self.hparams.per_head_metrics:
                for head, head_scores in enumerate(per_head):
                    scores.update({f"{prefix}/head{head}/{name}": v for name, v in head_scores.items()})
            for metrics in self.head_metrics:
                metrics.reset()
        scores[f"{prefix}/best_head"] = self.best_head.float()
        self.log_dict(scores)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._update_metrics(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._update_metrics(batch)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self(batch["x"])
        confidence, cluster = probs.max(dim=-1)
        return {"index": batch["index"], "cluster": cluster, "confidence": confidence}
