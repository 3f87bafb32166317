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

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from modules.ema import ema_update
from modules.losses.temi import PAIR_LOSSES, batch_entropy_regularizer, temi_head_losses, updated_marginal
from modules.method_base import MethodModule
from modules.metrics import ClusterOccupancy, label_metrics
from modules.networks.cluster_heads import SpecMLPHeads, TEMIHeads
from modules.optim import cosine_ramp, linear_ramp

NONFINITE_CHECK_EVERY = 50  # training steps between host reads of the non-finite streak


def build_heads(kind: str, input_dim: int, num_clusters: int, num_heads: int, hidden_dim: int,
                bottleneck_dim: int, dropout: float, train_last_norm: bool) -> nn.Module:
    if kind == "temi":
        return TEMIHeads(input_dim, num_clusters, num_heads, hidden_dim, bottleneck_dim, train_last_norm)
    if kind == "spec":
        return SpecMLPHeads(input_dim, num_clusters, num_heads, hidden_dim, dropout)
    raise ValueError(f"heads must be 'temi' or 'spec', got {kind!r}")


class TEMIClustering(MethodModule):
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
        lr: per 256 items of global batch (linear scaling rule); linear warmup over
            ``warmup_epochs``, then cosine to ``min_lr_factor * lr`` (official ``min_lr`` = 1e-4 = lr: 1.0).
        betas, weight_decay, compile, init_from, init_prefixes: see ``modules.method_base``.
        freeze_last_layer_epochs: epochs during which the last layer gets no update.
        per_head_metrics: also log every head's metrics, not only the selected head's.
        max_nonfinite_steps: a NaN/inf loss skips its step (decided on the device: the fused AdamW
            step and the teacher update are skipped, no state changes); this many in a row stop the
            run, checked every ``NONFINITE_CHECK_EVERY`` steps and at every epoch end.
    """

    NETWORKS = ("student", "teacher")
    FUSED_OPTIMIZER = True

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
        min_lr_factor: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        warmup_epochs: int = 20,
        freeze_last_layer_epochs: int = 1,
        per_head_metrics: bool = True,
        max_nonfinite_steps: int = 10,
        compile: bool = False,
        init_from: str | None = None,
        init_prefixes: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if pair_loss not in PAIR_LOSSES:
            raise ValueError(f"pair_loss must be one of {sorted(PAIR_LOSSES)}, got {pair_loss!r}")
        self.student = build_heads(heads, input_dim, num_clusters, num_heads, hidden_dim, bottleneck_dim,
                                   dropout, train_last_norm)
        # Eval from the start: Lightning restores each submodule's own mode around evaluation rather
        # than calling ``train()``, so the override below alone would leave the teacher training.
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.register_buffer("marginal", torch.full((num_heads, num_clusters), 1.0 / num_clusters))
        self.register_buffer("best_head", torch.tensor(0))
        self.register_buffer("epoch_head_loss", torch.zeros(num_heads))
        self.register_buffer("epoch_steps", torch.tensor(0))
        self.register_buffer("nonfinite_streak", torch.tensor(0))
        self.register_buffer("nonfinite_longest_streak", torch.tensor(0))
        self.register_buffer("nonfinite_total", torch.tensor(0))
        self.register_buffer("step_skipped", torch.tensor(False), persistent=False)
        self._statistics_before_step: list[torch.Tensor] = []  # the student's buffers as the step found them
        self.load_initial_weights()

    # ---- schedules ------------------------------------------------------------------------
    def teacher_temperature(self) -> float:
        hp = self.hparams
        return linear_ramp(self.current_epoch, hp.warmup_teacher_temp_epochs, hp.warmup_teacher_temp, hp.teacher_temp)

    def teacher_momentum(self) -> float:
        hp = self.hparams
        return cosine_ramp(self.global_step, self.total_steps, hp.teacher_momentum, hp.final_teacher_momentum)

    def peak_learning_rate(self) -> float:
        """Linear scaling rule: ``lr`` is per 256 items of the global batch."""
        trainer = self.trainer
        global_batch = self.hparams.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        return self.hparams.lr * global_batch / 256

    def requested_warmup_steps(self) -> int:
        trainer = self.trainer
        return self.hparams.warmup_epochs * max(1, trainer.num_training_batches // trainer.accumulate_grad_batches)

    # ---- training -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> TEMIClustering:
        super().train(mode)
        # The teacher only gives targets: no dropout, batch norm from its EMA'd running statistics.
        self.teacher.eval()
        return self

    def view_log_probs(self, net: nn.Module, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """Log-probabilities ``[2, H, B, K]`` of both views stacked in ``x = [x; x']`` (fp32 under autocast)."""
        logits = rearrange(net(x), "h (v b) k -> v h b k", v=2) / temperature
        return F.log_softmax(logits, dim=-1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        x = torch.cat([batch["x"], batch["x_pair"]])
        self._statistics_before_step = [buffer.clone() for buffer in self.student.buffers()]  # none in official heads
        student = self.view_log_probs(self.student, x, hp.student_temp)
        with torch.no_grad():
            teacher = self.view_log_probs(self.teacher, x, self.teacher_temperature())
            batch_marginal = self._over_ranks(teacher.exp().mean(dim=(0, 2)), "mean")
            marginal = updated_marginal(self.marginal, batch_marginal, hp.marginal_momentum)
        head_losses = temi_head_losses(student, teacher, marginal.log(), hp.beta, PAIR_LOSSES[hp.pair_loss])
        if hp.entropy_weight:
            head_losses = head_losses + hp.entropy_weight * batch_entropy_regularizer(student)
        loss = head_losses.mean()
        skip = self._track_nonfinite(loss)
        self.marginal.copy_(torch.where(skip, self.marginal, marginal))
        self.epoch_head_loss += torch.where(skip, 0.0, head_losses.detach().float())
        self.epoch_steps += (~skip).long()
        # A skipped step logs 0 with weight 0, so the epoch mean is over the steps taken.
        self.log("train/loss", torch.where(skip, 0.0, loss.detach()), on_step=True, on_epoch=True, prog_bar=True,
                 sync_dist=True, batch_size=(~skip).float() * len(batch["x"]))
        return loss

    def _over_ranks(self, value: torch.Tensor, reduce_op: str) -> torch.Tensor:
        """All-reduce across DDP ranks (``"mean"`` or ``"sum"``); identity without a trainer."""
        return self.trainer.strategy.reduce(value, reduce_op=reduce_op) if self._trainer is not None else value

    def _track_nonfinite(self, loss: torch.Tensor) -> torch.Tensor:
        """Whether to skip this step (agreed over ranks), counted on the device without a host read."""
        skip = self._over_ranks((~torch.isfinite(loss.detach())).float(), "sum") > 0
        self.step_skipped.copy_(skip)
        self.nonfinite_streak.copy_(torch.where(skip, self.nonfinite_streak + 1, 0))
        torch.maximum(self.nonfinite_longest_streak, self.nonfinite_streak, out=self.nonfinite_longest_streak)
        self.nonfinite_total += skip.long()
        return skip

    def check_nonfinite_streak(self) -> None:
        """Stop the run after ``max_nonfinite_steps`` skipped steps in a row (reads the device counters)."""
        longest = int(self.nonfinite_longest_streak)
        if longest >= self.hparams.max_nonfinite_steps:
            raise FloatingPointError(
                f"the TEMI loss was NaN or inf for {longest} steps in a row (by epoch {self.current_epoch}, "
                f"step {self.global_step}); stopping. Lower model.lr, raise model.student_temp, or check "
                "the embeddings; the last checkpoint is kept."
            )

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        if self.global_step % NONFINITE_CHECK_EVERY == 0:
            self.check_nonfinite_streak()

    def on_after_backward(self) -> None:
        # Official ``cancel_gradients_last_layer``: the last layer stays fixed at first.
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for param in self.student.last_layer.parameters():
                param.grad = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after the step's backward, before the update: fused AdamW skips the update where
        # ``found_inf`` is set, leaving weights, moments and step counts (torch.amp's GradScaler mechanism).
        optimizer.found_inf = self.step_skipped.float()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # A skipped batch must not leave NaN in the student's batch-norm statistics, which the teacher
        # copies and evaluation reads (restored after the backward, which still reads them).
        for buffer, before in zip(self.student.buffers(), self._statistics_before_step, strict=True):
            buffer.copy_(torch.where(self.step_skipped, before, buffer))
        ema_update(self.teacher, self.student, self.teacher_momentum(), skip=self.step_skipped)

    def on_train_epoch_start(self) -> None:
        # fp32 whatever the module's dtype (bf16-true converts buffers with the weights).
        self.epoch_head_loss = torch.zeros_like(self.epoch_head_loss, dtype=torch.float32)
        self.epoch_steps.zero_()

    def on_train_epoch_end(self) -> None:
        self.check_nonfinite_streak()
        mean_loss = self._select_best_head()
        # Logged once per epoch: each self.log costs ~0.7 ms, a tenth of a CPU step's overhead.
        self.log("train/teacher_temp", self.teacher_temperature())
        self.log("train/best_head", self.best_head.float())
        self.log("train/best_head_loss", mean_loss.min())
        self.log("train/nonfinite_steps", self.nonfinite_total.float())

    def _select_best_head(self) -> torch.Tensor:
        """Best head = lowest epoch-mean training loss over all ranks (official ``set_losses``).

        Called on every rank (it reduces); a no-op before the first training step of an epoch.
        """
        mean_loss = self._over_ranks(self.epoch_head_loss / self.epoch_steps.clamp_min(1), "mean")
        if self.epoch_steps.item() > 0:
            self.best_head.fill_(int(mean_loss.argmin()))
        return mean_loss

    # ---- evaluation -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster probabilities ``[B, K]`` of the teacher's selected head."""
        logits = self.teacher(x)[self.best_head]
        return F.softmax(logits / self.hparams.teacher_temp, dim=-1)

    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._select_best_head()

    def evaluation_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Every head's cluster ``[B, H]`` and, when the data has them, the labels."""
        return {"clusters": self.teacher(batch["x"]).argmax(dim=-1).T} | ({"y": batch["y"]} if "y" in batch else {})

    def evaluate(self, split: str, outputs: dict[str, torch.Tensor]) -> None:
        hp = self.hparams
        clusters, best = outputs["clusters"], int(self.best_head)
        # A metric's forward scores the values it is given without a DDP reduction: the set is whole.
        scores = ClusterOccupancy(hp.num_clusters).to(clusters.device)(clusters[:, best])
        if "y" in outputs:
            metrics = label_metrics(hp.num_clusters, hp.num_classes or hp.num_clusters).to(clusters.device)
            heads = range(hp.num_heads) if hp.per_head_metrics else [best]
            per_head = {head: metrics(clusters[:, head], outputs["y"]) for head in heads}
            scores |= per_head[best]
            if hp.per_head_metrics:
                scores |= {f"head{head}/{name}": value for head, values in per_head.items()
                           for name, value in values.items()}
        scores["best_head"] = self.best_head.float()
        # Identical on every rank (computed from the gathered set), so no reduction is needed.
        self.log_dict({f"{split}/{name}": value for name, value in scores.items()}, sync_dist=False)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self(batch["x"])
        confidence, cluster = probs.max(dim=-1)
        return {"index": batch["index"], "cluster": cluster, "confidence": confidence}
