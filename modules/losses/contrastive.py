"""Contrastive and invariance objectives on readout embeddings ``z = g(V)`` (spec 004, P2 and P3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(queries: torch.Tensor, keys: torch.Tensor, positive_index: torch.Tensor,
             temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE (van den Oord et al. 2018) with cosine similarity:
    ``-log exp(s(q_i, k_{p(i)}) / t) / sum_j exp(s(q_i, k_j) / t)``, averaged over queries.

    ``keys`` holds every candidate: the positives of all queries (in-batch negatives for the
    others) and any extra negatives, e.g. the counterfactuals of P2. ``positive_index[i]`` is the
    row of ``keys`` that is the positive of ``queries[i]``.
    """
    if queries.shape[-1] != keys.shape[-1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} differ in width")
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T / temperature
    return F.cross_entropy(logits, positive_index)


def symmetric_info_nce(z_a: torch.Tensor, z_b: torch.Tensor, all_a: torch.Tensor, all_b: torch.Tensor,
                       negatives: torch.Tensor | None, offset: int, temperature: float = 0.07) -> torch.Tensor:
    """P2's InfoNCE over a global batch, both ways: each view ``z_a[i]`` (``z_b[i]``) has the other view of its
    scene, row ``offset + i`` of ``all_b`` (``all_a``: every rank's views, this rank's from ``offset``), as its
    positive; every other scene's views and the extra ``negatives`` (e.g. the counterfactuals) are negatives."""
    positive = torch.arange(len(z_a), device=z_a.device) + offset
    extra = [] if negatives is None else [negatives]
    return 0.5 * (info_nce(z_a, torch.cat([all_b, *extra]), positive, temperature)
                  + info_nce(z_b, torch.cat([all_a, *extra]), positive, temperature))


def vicreg_regularizer(z: torch.Tensor, std_target: float = 1.0, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """VICReg's variance and covariance terms on one branch (Bardes et al. 2022, eq. 1 and 3):
    hinge on each dimension's std across the batch, and squared off-diagonal covariances / D."""
    z = z - z.mean(dim=0)
    std = torch.sqrt(z.var(dim=0) + eps)
    covariance = z.T @ z / (len(z) - 1)
    off_diagonal = covariance - torch.diag_embed(torch.diagonal(covariance))
    return {
        "variance": F.relu(std_target - std).mean(),
        "covariance": off_diagonal.pow(2).sum() / z.shape[1],
    }


def invariance_loss(z_jittered: torch.Tensor, z_other: torch.Tensor, unit: bool = True) -> torch.Tensor:
    """Spec P3's ``||g(T(V(x1))) - g(V(x2))||^2``, averaged over the batch. ``unit`` compares the directions
    (``2 - 2 cos``): InfoNCE reads ``z`` only through its direction, so on raw ``z`` (``unit=False``, the
    spec's literal form) the term can be met by shrinking every ``z`` without making anything invariant."""
    if z_jittered.shape != z_other.shape:
        raise ValueError(f"jittered and other views differ in shape: {tuple(z_jittered.shape)} and "
                         f"{tuple(z_other.shape)}")
    if unit:
        z_jittered, z_other = F.normalize(z_jittered, dim=-1), F.normalize(z_other, dim=-1)
    return (z_jittered - z_other).square().sum(dim=-1).mean()
