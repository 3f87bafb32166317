"""How close generated samples are to held-out data: three distances between point clouds.

* ``wasserstein2``: the exact 2-Wasserstein distance between two equal-size empirical clouds,
  by optimal assignment (cubic in the number of points, so for a few thousand points at most).
* ``rbf_mmd2``: the unbiased squared maximum mean discrepancy with Gaussian kernels whose
  bandwidths come from the reference data only, so scores of different models share a kernel.
* ``frechet_distance``: the Fréchet distance between Gaussian fits of features from a given
  network (FID's formula with a custom feature extractor, through torchmetrics).

Points are rows: every tensor is ``[N, ...]`` and is flattened over its non-batch axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

BANDWIDTH_SCALES = (0.5, 1.0, 2.0)


def _rows(points: torch.Tensor, name: str) -> torch.Tensor:
    """``[N, ...] -> [N, D]``, refusing clouds without a batch axis or with NaN/inf rows."""
    if points.dim() < 1 or len(points) == 0:
        raise ValueError(f"{name} must be a non-empty [N, ...] tensor of points; "
                         f"got shape {tuple(points.shape)}")
    rows = rearrange(points, "n ... -> n (...)")
    bad_rows = (~torch.isfinite(rows)).any(dim=1).sum().item()
    if bad_rows:
        raise ValueError(f"{name} has {bad_rows} of {len(rows)} rows with NaN or infinite values")
    return rows


def wasserstein2(samples: torch.Tensor, reference: torch.Tensor, max_points: int = 5000) -> torch.Tensor:
    """Exact 2-Wasserstein distance between two empirical distributions of ``N`` points each.

    With equal uniform weights the optimal transport plan is a permutation (Birkhoff–von
    Neumann; Peyré & Cuturi, "Computational Optimal Transport", Prop. 2.1), found here by
    ``scipy.optimize.linear_sum_assignment`` on the squared Euclidean costs:
    ``W2 = sqrt(min_perm (1/N) sum_i ||x_i - y_perm(i)||^2)``. Returns a float64 scalar.
    """
    x, y = _rows(samples, "samples"), _rows(reference, "reference")
    if x.shape != y.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} differ in "
                         "shape; draw as many samples as there are reference points, of the same shape")
    if len(x) > max_points:
        raise ValueError(f"{len(x)} points exceed max_points={max_points}: the assignment grows cubically "
                         "with the number of points; subsample both clouds")
    # float64 and the direct difference: cdist's matrix-product shortcut loses digits of small costs.
    cost = torch.cdist(x.double(), y.double(), compute_mode="donot_use_mm_for_euclid_dist").square()
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return cost[torch.as_tensor(rows), torch.as_tensor(cols)].mean().sqrt()


def median_distance(points: torch.Tensor) -> torch.Tensor:
    """Median Euclidean distance between pairs of distinct rows: the "median heuristic" for a
    Gaussian kernel's bandwidth (Gretton et al., JMLR 2012, "A Kernel Two-Sample Test")."""
    rows = _rows(points, "points").double()
    distances = torch.pdist(rows)
    if len(distances) == 0:
        raise ValueError(f"the median distance needs at least 2 points; got shape {tuple(points.shape)}")
    return distances.median()


def _kernel_sum(distances_squared: torch.Tensor, bandwidths: torch.Tensor) -> torch.Tensor:
    """``sum_sigma exp(-d^2 / (2 sigma^2))`` elementwise."""
    return torch.exp(-distances_squared[..., None] / (2 * bandwidths**2)).sum(dim=-1)


def rbf_mmd2(samples: torch.Tensor, reference: torch.Tensor,
             bandwidths: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased squared MMD with a sum of Gaussian kernels (Gretton et al., JMLR 2012, eq. 3):

    ``MMD_u^2 = 1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j)
    - 2/(mn) sum_{i,j} k(x_i, y_j)``, with ``k(x, y) = sum_sigma exp(-||x - y||^2 / (2 sigma^2))``.

    By default the bandwidths are the median pairwise distance among the *reference* points times
    ``BANDWIDTH_SCALES`` (0.5, 1, 2), so the kernel is fixed by the data and does not change with
    the model being scored. Unbiased means it can be slightly negative when the two distributions
    agree. Needs at least 2 points on each side; returns a float64 scalar.
    """
    x, y = _rows(samples, "samples").double(), _rows(reference, "reference").double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} have "
                         "different numbers of coordinates per point")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 points on each side; got samples "
                         f"{tuple(samples.shape)} and reference {tuple(reference.shape)}")
    sigma = _bandwidths(reference, bandwidths).to(x.device)
    m, n = len(x), len(y)
    # The diagonal of k(x, x) is one per bandwidth: subtracting it drops the i = j terms.
    within_x = (_kernel_sum(torch.cdist(x, x).square(), sigma).sum() - m * len(sigma)) / (m * (m - 1))
    within_y = (_kernel_sum(torch.cdist(y, y).square(), sigma).sum() - n * len(sigma)) / (n * (n - 1))
    across = _kernel_sum(torch.cdist(x, y).square(), sigma).sum() / (m * n)
    return within_x + within_y - 2 * across


def _bandwidths(reference: torch.Tensor, bandwidths: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    if bandwidths is None:
        median = median_distance(reference)
        if median <= 0:
            raise ValueError("the median distance between reference points is 0 (mostly repeated points); "
                             "pass bandwidths explicitly")
        return median * torch.tensor(BANDWIDTH_SCALES, dtype=torch.float64, device=median.device)
    sigma = torch.as_tensor(bandwidths, dtype=torch.float64).flatten()
    if len(sigma) == 0 or (sigma <= 0).any():
        raise ValueError(f"bandwidths must be positive numbers; got {sigma.tolist()}")
    return sigma


def frechet_distance(feature_extractor: nn.Module, samples: torch.Tensor, reference: torch.Tensor,
                     batch_size: int = 1024) -> float:
    """Fréchet distance between Gaussian fits of the features of two sets (Heusel et al., NeurIPS
    2017, "GANs Trained by a Two Time-Scale Update Rule ...", the FID formula):
    ``||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``.

    Computed by torchmetrics' ``FrechetInceptionDistance`` with ``feature_extractor`` in place of
    Inception: the module must map a float batch ``[B, ...]`` shaped like ``reference`` to
    ``[B, d]`` and carry an int ``num_features = d``; with ``normalize=True`` the inputs reach it
    unchanged (no rescaling to bytes). Means and covariances (ddof 1) are accumulated in float64.
    The module's train/eval mode is left alone: put it in eval mode first if that matters.
    Inputs are moved to the device of the module's parameters.
    """
    num_features = getattr(feature_extractor, "num_features", None)
    if not isinstance(num_features, int):
        raise ValueError(f"feature_extractor needs an int attribute num_features (its output width); "
                         f"got {num_features!r}")
    if samples.shape[1:] != reference.shape[1:] or len(samples) < 2 or len(reference) < 2:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} must each "
                         "hold at least 2 items of the same shape")
    parameter = next(feature_extractor.parameters(), None)
    device = reference.device if parameter is None else parameter.device
    metric = FrechetInceptionDistance(feature=feature_extractor, normalize=True,
                                      input_img_size=tuple(reference.shape[1:])).to(device)
    for points, real in ((reference, True), (samples, False)):
        for batch in points.split(batch_size):
            metric.update(batch.to(device).float(), real=real)
    return float(metric.compute())
