"""TEMI losses (Adaloglou et al., BMVC 2023, "Exploring the Limits of Deep Image Clustering
using Pretrained Models"), as pure functions.

Shapes: ``[V, H, B, K]`` for V=2 views (an item and one of its kNN), H heads, B items,
K clusters; ``log_marginal`` is ``[H, K]``. All inputs are log-probabilities, which keeps the
``beta`` power and the division by ``p(k)`` stable in log space.

Two per-pair forms:

* ``beta_pmi`` (default; paper Eq. 6 and the official ``losses/loss_utils.beta_mi``):
  ``-log sum_k (q_s(k|x) q_t(k|x'))^beta / p(k)``.
* ``spec_beta_mi`` (the form in spec 003, kept as a named option to measure it):
  ``-sum_k [(q_s q_t / p(k))^beta p(k)] log(q_s q_t / p(k))``, with the spec's clamps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def beta_pmi(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, log_marginal: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Per-item TEMI loss ``-log sum_k (q_s q_t)^beta / p(k)``; reduces the last (cluster) axis.

    With ``beta = 1`` this is the negative pointwise mutual information of the pair.
    """
    return -torch.logsumexp(beta * (student_log_probs + teacher_log_probs) - log_marginal, dim=-1)


def spec_beta_mi(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, log_marginal: torch.Tensor,
                 beta: float, eps: float = 1e-8, max_pmi: float = 100.0) -> torch.Tensor:
    """Spec 003's replacement: ``-sum_k ((q_s q_t / p)^beta p) log(q_s q_t / p)``, clamped as the spec does."""
    ratio = (student_log_probs + teacher_log_probs - log_marginal).exp().clamp_min(eps)
    weight = ratio**beta * log_marginal.exp()
    return -(weight * ratio.log().clamp(max=max_pmi)).sum(dim=-1)


PAIR_LOSSES: dict[str, PairLoss] = {"official": beta_pmi, "spec": spec_beta_mi}


def teacher_pair_weight(teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-item weight ``mean_h sum_k q_t(k|x) q_t(k|x')`` of the teacher ensemble; ``[B]``."""
    probs = teacher_log_probs.exp()
    return (probs[0] * probs[1]).sum(dim=-1).mean(dim=0)


def temi_head_losses(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor,
                     log_marginal: torch.Tensor, beta: float, pair_loss: PairLoss = beta_pmi) -> torch.Tensor:
    """Weighted, symmetrized TEMI loss of each head; ``[H]``.

    Student view ``v`` meets teacher view ``1 - v`` (never the same view), each pair term is
    weighted by ``teacher_pair_weight`` (no gradient), averaged over both directions and the batch.
    """
    weight = teacher_pair_weight(teacher_log_probs).detach()
    crossed = pair_loss(student_log_probs, teacher_log_probs.flip(0).detach(), log_marginal.unsqueeze(1), beta)
    return (weight * crossed).mean(dim=(0, 2))


def batch_entropy_regularizer(student_log_probs: torch.Tensor) -> torch.Tensor:
    """Spec 003's balance term ``sum_k pbar_k log pbar_k`` of each head's batch-mean prediction; ``[H]``.

    Minimizing it maximizes the entropy of the batch marginal, averaged over views.
    """
    log_mean = student_log_probs.logsumexp(dim=2) - torch.log(torch.tensor(float(student_log_probs.shape[2])))
    return (log_mean.exp() * log_mean).sum(dim=-1).mean(dim=0)


def updated_marginal(marginal: torch.Tensor, batch_mean_probs: torch.Tensor, momentum: float) -> torch.Tensor:
    """EMA of the teacher's batch-mean cluster probabilities (official ``update_ema``), ``[H, K]``."""
    return marginal * momentum + batch_mean_probs * (1.0 - momentum)
