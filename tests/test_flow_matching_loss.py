"""Flow-matching path, target and the locality pairing, against hand-computed values."""

import pytest
import torch

from modules.losses.flow_matching import (
    cluster_mate_pairs,
    flow_matching_loss,
    flow_target,
    linear_path,
    locality_loss,
    masked_mean,
    perturbed_source,
    residual_locality_loss,
)


def test_linear_path_and_target_by_hand():
    x0 = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    x1 = torch.tensor([[4.0, -2.0], [3.0, 5.0]])
    t = torch.tensor([0.25, 1.0])
    # row 0: 0.75*[0,2] + 0.25*[4,-2] = [1, 1]; row 1 at t=1 is x1
    assert torch.equal(linear_path(x0, x1, t), torch.tensor([[1.0, 1.0], [3.0, 5.0]]))
    assert torch.equal(flow_target(x0, x1), torch.tensor([[4.0, -4.0], [2.0, 4.0]]))
    assert torch.equal(linear_path(x0, x1, torch.zeros(2)), x0)


def test_target_is_the_time_derivative_of_the_path():
    x0, x1 = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.rand(3, requires_grad=True)
    path = linear_path(x0, x1, t)
    derivative = torch.autograd.grad(path.sum(), t)[0]
    assert torch.allclose(derivative, flow_target(x0, x1).flatten(1).sum(1), atol=1e-5)


def test_linear_path_rejects_one_time_for_the_batch():
    with pytest.raises(ValueError, match=r"one time per sample, shape \[4\]"):
        linear_path(torch.zeros(4, 2), torch.ones(4, 2), torch.tensor(0.5))


def test_flow_loss_averages_over_dimensions():
    velocity = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 3.0], [0.0, 2.0]])
    # squared errors per sample (0 + 4) / 2 = 2 and (0 + 4) / 2 = 2
    assert flow_matching_loss(velocity, target).item() == pytest.approx(2.0)


def test_every_valid_pair_shares_a_cluster_and_no_sample_pairs_with_itself():
    generator = torch.Generator().manual_seed(0)
    clusters = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])
    for _ in range(20):
        partner, valid = cluster_mate_pairs(clusters, generator=generator)
        assert torch.equal(valid, torch.tensor([True, True, True, False, True, True, False, True]))
        assert torch.equal(clusters[partner], clusters)
        rows = torch.arange(8)
        assert (partner[valid] != rows[valid]).all() and torch.equal(partner[~valid], rows[~valid])


def test_pairing_draws_every_mate_and_skips_repeats_of_the_same_item():
    generator = torch.Generator().manual_seed(1)
    clusters = torch.tensor([5, 5, 5, 5])
    seen = {int(cluster_mate_pairs(clusters, generator=generator)[0][0]) for _ in range(100)}
    assert seen == {1, 2, 3}
    # positions 0 and 1 hold the same dataset item: not a pair
    partner, valid = cluster_mate_pairs(torch.tensor([2, 2, 7]), item_ids=torch.tensor([9, 9, 4]))
    assert not valid.any() and torch.equal(partner, torch.arange(3))


def test_locality_loss_over_valid_pairs_only_and_masked_pairs_get_no_gradient():
    velocity = torch.tensor([[1.0, 1.0], [0.0, 0.0], [5.0, 5.0]], requires_grad=True)
    partner = torch.tensor([[1.0, 3.0], [2.0, 0.0], [float("nan"), 0.0]])
    valid = torch.tensor([True, True, False])
    loss = locality_loss(velocity, partner, valid)
    # pairs: (0 + 4)/2 = 2 and (4 + 0)/2 = 2 -> mean 2; the NaN pair is masked
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert torch.equal(velocity.grad[2], torch.zeros(2))
    assert velocity.grad[:2].abs().sum() > 0


def test_residual_locality_is_zero_for_equal_residuals_and_masked_like_the_spec_term():
    target, partner_target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[3.0, 2.0], [1.0, 1.0]])
    both_valid = torch.tensor([True, True])
    # a field that fits both targets up to the same error: different velocities, equal residuals
    error = torch.tensor([[0.5, -0.5], [2.0, 0.0]])
    assert residual_locality_loss(target + error, target, partner_target + error, partner_target,
                                  both_valid).item() == 0.0
    assert locality_loss(target + error, partner_target + error, both_valid).item() > 0  # the spec's is not
    velocity = torch.tensor([[1.0, 2.0], [4.0, 4.0]], requires_grad=True)
    partner_velocity = torch.tensor([[3.0, 4.0], [float("nan"), 0.0]])
    loss = residual_locality_loss(velocity, target, partner_velocity, partner_target, torch.tensor([True, False]))
    # pair 0: residuals (0, 0) and (0, 2): (0 + 4) / 2 = 2; pair 1 (NaN) is masked
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert torch.equal(velocity.grad[1], torch.zeros(2)) and velocity.grad[0].abs().sum() > 0


def test_no_valid_pair_gives_zero_not_nan():
    assert masked_mean(torch.tensor([3.0, 1.0]), torch.tensor([False, False])).item() == 0.0


def test_perturbed_source_adds_the_items_own_noise_scaled():
    x0, noise = torch.zeros(2, 3), torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.5, 0.5]])
    assert torch.equal(perturbed_source(x0, noise, 0.1), 0.1 * noise)
    with pytest.raises(ValueError, match=r"noise must have the shape of x0 \(2, 3\), got \(2,\)"):
        perturbed_source(x0, torch.zeros(2), 0.1)
