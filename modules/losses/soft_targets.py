"""Symmetric InfoNCE between IMU and text embeddings with soft targets (spec 002; issue 10).

For a batch of ``B`` windows with unit IMU embeddings ``u_i``, unit text embeddings ``t_i`` (a
description of window ``i``'s activity) and logit scale ``s = 1 / tau``, the logits are
``L_ij = s * u_i . t_j`` and the loss is

    loss = ( CE_rows(L, Y) + CE_rows(L^T, Y^T normalized per row) ) / 2,
    CE_rows(L, Y) = -1/B sum_i sum_j Y_ij log softmax_j(L_ij),

with a target matrix ``Y`` whose rows sum to one. The targets (``TARGET_MODES``):

* ``hard``: ``Y = I`` (the spec's baseline; two windows of one activity push each other apart);
* ``label_aware``: ``Y_ij = [y_i = y_j] / #{k : y_k = y_i}``, every same-label pair a positive;
* ``pairwise``: ``S_ij = softmax_j(t_i . t_j / T_soft)`` (spec, "Pairwise Soft Targets");
* ``prototype``: ``S_ij = softmax_j(p_i . t_j / T_soft)`` with ``p_i`` the k-means prototype of
  window ``i``'s label (spec, "Step 4: Use Prototypes as Soft Targets");
* ``hybrid``: ``(1 - w_p) S_pairwise + w_p S_prototype`` (spec, "Hybrid Mode").

Every soft mode is blended with the hard target, ``Y = (1 - w_s) I + w_s S`` (spec's
``soft_target_weight``, 0.5; ``prototype_weight`` ``w_p`` 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TARGET_MODES = ("hard", "label_aware", "pairwise", "prototype", "hybrid")


def hard_targets(batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.eye(batch_size, device=device)


def label_aware_targets(labels: torch.Tensor) -> torch.Tensor:
    """``[B, B]``: a uniform distribution over the batch items sharing item ``i``'s label (``i`` included)."""
    same = (labels.unsqueeze(1) == labels.unsqueeze(0)).float()
    return same / same.sum(dim=1, keepdim=True)


def similarity_targets(queries: torch.Tensor, texts: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax_j(q_i . t_j / temperature)``: pairwise targets with ``queries = texts``, prototype
    targets with ``queries`` the prototype of each item's label."""
    return torch.softmax(queries.float() @ texts.float().T / temperature, dim=1)


def blend(first: torch.Tensor, second: torch.Tensor, weight: float) -> torch.Tensor:
    return (1.0 - weight) * first + weight * second


def alignment_targets(mode: str, labels: torch.Tensor, texts: torch.Tensor,
                      label_prototypes: torch.Tensor | None = None, soft_temperature: float = 0.1,
                      soft_target_weight: float = 0.5, prototype_weight: float = 0.5) -> torch.Tensor:
    """The ``[B, B]`` target matrix of ``mode`` (rows sum to one), see the module docstring.

    labels ``[B]``; texts ``[B, D]`` unit rows; label_prototypes ``[B, D]`` the prototype of each
    item's label (needed by ``prototype`` and ``hybrid`` only).
    """
    if mode not in TARGET_MODES:
        raise ValueError(f"target mode must be one of {TARGET_MODES}, got {mode!r}")
    hard = hard_targets(len(labels), labels.device)
    if mode == "hard":
        return hard
    if mode in ("prototype", "hybrid") and label_prototypes is None:
        raise ValueError(f"target mode {mode!r} needs the prototype of each item's label")
    if mode == "label_aware":
        soft = label_aware_targets(labels)
    elif mode == "pairwise":
        soft = similarity_targets(texts, texts, soft_temperature)
    elif mode == "prototype":
        soft = similarity_targets(label_prototypes, texts, soft_temperature)
    else:
        soft = blend(similarity_targets(texts, texts, soft_temperature),
                     similarity_targets(label_prototypes, texts, soft_temperature), prototype_weight)
    return blend(hard, soft, soft_target_weight)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-1/B sum_ij Y_ij log softmax_j(L_ij)``; equals ``F.cross_entropy(logits, arange(B))`` for ``Y = I``."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def symmetric_infonce(imu: torch.Tensor, texts: torch.Tensor, targets: torch.Tensor,
                      logit_scale: torch.Tensor | float) -> torch.Tensor:
    """IMU-to-text and text-to-IMU cross-entropy against ``targets`` (rows summing to one), averaged.

    The text-to-IMU direction reads the columns of ``targets``, renormalized: column ``j`` says which
    windows text ``j`` should retrieve.
    """
    if imu.shape != texts.shape or targets.shape != (len(imu), len(imu)):
        raise ValueError(f"InfoNCE needs IMU and text embeddings of one shape [B, D] and targets [B, B], got "
                         f"{tuple(imu.shape)}, {tuple(texts.shape)} and {tuple(targets.shape)}")
    logits = logit_scale * imu.float() @ texts.float().T
    columns = targets.T / targets.T.sum(dim=1, keepdim=True)
    return 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, columns))
