"""Sample quality of a velocity field as a function of the number of function evaluations (NFE).

For each NFE the field is integrated from the same source draws, and the samples are scored
against held-out data: exact 2-Wasserstein distance, unbiased RBF-MMD^2 and, given a feature
extractor, the Frechet distance in its feature space. Path statistics (Liu et al. 2022's
straightness and the path length ratio) come from the Euler path with the largest NFE.
Used by the module's validation and by ``benchmarks/cluster_flow.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from modules.ode import VelocityField, integrate, path_statistics
from modules.sample_quality import frechet_distance, rbf_mmd2, wasserstein2


def score_samples(samples: torch.Tensor, reference: torch.Tensor, features: nn.Module | None = None) -> dict[str, float]:
    """W2, MMD^2 (and Frechet distance); NaN for all when a sample is not finite (a diverged field)."""
    if not torch.isfinite(samples).all():
        names = ("w2", "mmd2") + (("fd",) if features is not None else ())
        return dict.fromkeys(names, float("nan"))
    scores = {"w2": float(wasserstein2(samples, reference)), "mmd2": float(rbf_mmd2(samples, reference))}
    if features is not None:
        scores["fd"] = float(frechet_distance(features, samples, reference))
    return scores


@torch.no_grad()
def quality_by_nfe(velocity: VelocityField, x0: torch.Tensor, reference: torch.Tensor, nfe_grid: Sequence[int],
                   solver: str = "euler", features: nn.Module | None = None) -> dict[str, float]:
    """``{"w2_nfe1": ..., "mmd2_nfe1": ..., ["fd_nfe1": ...,] ..., "straightness": ..., "path_length_ratio": ...}``."""
    results = {}
    for nfe in nfe_grid:
        samples = integrate(velocity, x0, nfe, solver)
        results |= {f"{name}_nfe{nfe}": value for name, value in score_samples(samples, reference, features).items()}
    paths = path_statistics(velocity, x0, max(nfe_grid))
    return results | {name: float(value) for name, value in paths.items()}
