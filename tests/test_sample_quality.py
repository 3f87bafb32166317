"""Sample-quality distances: hand values, closed forms, invariances and the errors for bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from modules.sample_quality import frechet_distance, median_distance, rbf_mmd2, wasserstein2


def normal(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- wasserstein2 -------------------------------------------------------------------------------


def test_wasserstein2_by_hand():
    # {0, 1} against {3, 1}: matching 0->1, 1->3 costs 1 + 4 (the other matching costs 9 + 0),
    # so W2 = sqrt(5 / 2).
    samples, reference = torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0], [1.0]])
    assert wasserstein2(samples, reference).item() == pytest.approx(math.sqrt(2.5), abs=1e-12)


def test_wasserstein2_in_one_dimension_matches_sorted_points():
    # In 1-D the monotone (sorted) coupling is optimal.
    x, y = normal(300, 1, seed=0), normal(300, 1, seed=1) * 2 + 1
    expected = (x.flatten().sort().values - y.flatten().sort().values).square().mean().sqrt().item()
    assert wasserstein2(x, y).item() == pytest.approx(expected, rel=1e-10)


def test_wasserstein2_of_a_translated_cloud_is_the_shift_length():
    # E||x - (y + c)||^2 = E||x - y||^2 + ||c||^2 for clouds with equal means, so the identity
    # matching is optimal and W2 = ||c||; the rows are shuffled to make the solver find it.
    x = normal(200, 2, 2, seed=2)
    shift = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    shuffled = (x + shift)[torch.randperm(200, generator=torch.Generator().manual_seed(3))]
    assert wasserstein2(x, shuffled).item() == pytest.approx(shift.norm().item(), rel=1e-10)
    assert wasserstein2(x, x.flip(0)).item() == pytest.approx(0.0, abs=1e-12)


def test_wasserstein2_errors_explain_themselves():
    with pytest.raises(ValueError, match=r"samples \(3, 2\) and reference \(4, 2\).*draw as many samples"):
        wasserstein2(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="11 points exceed max_points=10.*cubically.*subsample"):
        wasserstein2(torch.zeros(11, 2), torch.zeros(11, 2), max_points=10)
    bad = torch.zeros(5, 2)
    bad[1, 0], bad[3, 1] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="samples has 2 of 5 rows with NaN or infinite values"):
        wasserstein2(bad, torch.zeros(5, 2))


# --- rbf_mmd2 -----------------------------------------------------------------------------------


def test_rbf_mmd2_by_hand():
    # X = {0, 1}, Y = {2, 4}, sigma = 1, k(a, b) = exp(-(a - b)^2 / 2):
    #   within X: k(0, 1) = e^-0.5 (1/(2*1) of the two off-diagonal terms)
    #   within Y: k(2, 4) = e^-2
    #   across:   (2 / 4) (k(0,2) + k(0,4) + k(1,2) + k(1,4)) = (e^-2 + e^-8 + e^-0.5 + e^-4.5) / 2
    # MMD^2 = (e^-0.5 + e^-2 - e^-8 - e^-4.5) / 2 = (0.60653 + 0.13534 - 0.00034 - 0.01111) / 2 = 0.36521
    expected = (math.exp(-0.5) + math.exp(-2) - math.exp(-8) - math.exp(-4.5)) / 2
    mmd = rbf_mmd2(torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [4.0]]), bandwidths=[1.0])
    assert mmd.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.36521, abs=1e-5)


def test_rbf_mmd2_sums_kernels_over_bandwidths():
    x, y = normal(20, 3, seed=0), normal(30, 3, seed=1) + 0.5
    total = rbf_mmd2(x, y, bandwidths=[0.5, 2.0])
    parts = rbf_mmd2(x, y, bandwidths=[0.5]) + rbf_mmd2(x, y, bandwidths=[2.0])
    assert total.item() == pytest.approx(parts.item(), abs=1e-12)


def test_rbf_mmd2_is_symmetric_for_a_fixed_kernel():
    x, y = normal(40, 2, seed=4), normal(25, 2, seed=5) * 1.5
    assert rbf_mmd2(x, y, bandwidths=[1.0, 3.0]).item() == pytest.approx(
        rbf_mmd2(y, x, bandwidths=[1.0, 3.0]).item(), abs=1e-12)


def test_rbf_mmd2_separates_shifted_distributions():
    reference = normal(800, 2, seed=6)
    same = rbf_mmd2(normal(800, 2, seed=7), reference).item()
    shifted = rbf_mmd2(normal(800, 2, seed=8) + 1.0, reference).item()
    assert abs(same) < 5e-3
    assert shifted > 0.1 and shifted > 20 * abs(same)


def test_default_bandwidths_come_from_the_reference_only():
    reference = normal(50, 2, seed=9)
    samples = normal(50, 2, seed=10) * 5
    sigma = median_distance(reference).item()
    expected = rbf_mmd2(samples, reference, bandwidths=[0.5 * sigma, sigma, 2 * sigma])
    assert rbf_mmd2(samples, reference).item() == pytest.approx(expected.item(), abs=1e-12)
    # Scaling the samples changes their own median distance but not the kernel.
    assert rbf_mmd2(samples * 2, reference).item() != pytest.approx(expected.item(), abs=1e-3)


def test_median_distance_by_hand():
    # Distances among {0, 1, 3}: 1, 3, 2 -> median 2.
    assert median_distance(torch.tensor([[0.0], [1.0], [3.0]])).item() == 2.0


def test_rbf_mmd2_errors_explain_themselves():
    with pytest.raises(ValueError, match="at least 2 points on each side"):
        rbf_mmd2(torch.zeros(1, 2), torch.ones(5, 2))
    with pytest.raises(ValueError, match="different numbers of coordinates"):
        rbf_mmd2(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="median distance between reference points is 0"):
        rbf_mmd2(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="bandwidths must be positive"):
        rbf_mmd2(torch.zeros(4, 2), torch.ones(4, 2), bandwidths=[1.0, 0.0])
    with pytest.raises(ValueError, match="reference has 1 of 4 rows with NaN"):
        rbf_mmd2(torch.zeros(4, 2), torch.tensor([[0.0, 1.0]] * 3 + [[float("nan"), 0.0]]))


# --- frechet_distance ---------------------------------------------------------------------------


class FlattenFeatures(nn.Module):
    """The identity on flattened inputs, so the Fréchet distance is that of the raw coordinates."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def closed_form_frechet(x: np.ndarray, y: np.ndarray) -> float:
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    cross = scipy.linalg.sqrtm(cov_x @ cov_y).real
    return float(np.sum((mu_x - mu_y) ** 2) + np.trace(cov_x + cov_y - 2 * cross))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    images = normal(300, 1, 2, 2, seed=11).float()
    assert frechet_distance(FlattenFeatures(4), images, images) == pytest.approx(0.0, abs=1e-3)


def test_frechet_distance_matches_the_closed_form():
    reference = normal(400, 1, 2, 2, seed=12).float()
    mixing = torch.tensor([[1.5, 0.2, 0.0, 0.0], [0.0, 0.7, 0.3, 0.0],
                           [0.0, 0.0, 1.0, 0.0], [0.4, 0.0, 0.0, 0.5]])
    shift = torch.tensor([1.0, -0.5, 0.0, 2.0])
    samples = (normal(400, 4, seed=13).float() @ mixing + shift).view(400, 1, 2, 2)
    expected = closed_form_frechet(samples.flatten(1).double().numpy(), reference.flatten(1).double().numpy())
    assert expected > 3.0
    # Small batches check that the accumulation over batches adds up.
    distance = frechet_distance(FlattenFeatures(4), samples, reference, batch_size=64)
    assert distance == pytest.approx(expected, rel=1e-4)


def test_frechet_distance_needs_num_features():
    with pytest.raises(ValueError, match="int attribute num_features"):
        frechet_distance(nn.Flatten(), torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"samples \(4, 3\) and reference \(4, 2\)"):
        frechet_distance(FlattenFeatures(2), torch.zeros(4, 3), torch.zeros(4, 2))
