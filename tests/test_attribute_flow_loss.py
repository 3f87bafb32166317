"""The attribute flow's losses and sphere steps against values computed by hand (spec 001, issue 11)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modules.losses.attribute_flow import (
    batch_mean_prototypes,
    identity_loss,
    prototype_infonce,
    same_combination_mask,
    separation_loss,
    supervised_contrastive,
)
from modules.networks.attribute_field import AttributeField, flow_on_sphere


def _cross_entropy(logits: list[float], target: int) -> float:
    return -(logits[target] - math.log(sum(math.exp(value) for value in logits)))


def test_positive_mask_is_bit_identity_not_shared_ones():
    rows = torch.tensor([[1.0, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    mask = same_combination_mask(rows, rows)
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    # The spec's public form marks only the all-ones row, even against itself.
    spec_form = rows @ rows.T == rows.shape[1]
    assert torch.equal(spec_form, torch.tensor([[0, 0, 0, 0]] * 3 + [[0, 0, 0, 1]], dtype=torch.bool))
    missed = (mask & ~spec_form).nonzero().tolist()
    assert missed == [[0, 0], [0, 2], [1, 1], [2, 0], [2, 2]]
    assert not mask[0, 1] and not mask[1, 0]  # [1,1,0,0,0] and [1,1,1,0,0] share two ones, not a positive


def test_positive_mask_rejects_different_widths():
    with pytest.raises(ValueError, match=r"\[N, A\] and \[M, A\]"):
        same_combination_mask(torch.zeros(2, 5), torch.zeros(2, 4))


POINTS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
PROTOTYPES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
PROTOTYPE_CODES = torch.tensor([3, 7, 12])
TARGETS = torch.tensor([3, 12, 7])


def _three_point_loss() -> float:
    # temperature 0.5: logits are twice the cosines
    return (_cross_entropy([2.0, 0.0, -2.0], 0) + _cross_entropy([0.0, 2.0, 0.0], 2)
            + _cross_entropy([1.2, 1.6, -1.2], 1)) / 3


def test_prototype_infonce_by_hand():
    loss, excluded = prototype_infonce(POINTS, TARGETS, PROTOTYPES, PROTOTYPE_CODES, temperature=0.5)
    assert loss.item() == pytest.approx(_three_point_loss(), abs=1e-6)
    assert excluded.item() == 0


def test_rows_without_a_prototype_are_excluded_and_counted():
    # A fourth row targets combination 31, which has no prototype; an empty row (code -1, zeros)
    # would add exp(0) to every denominator if it counted as a negative.
    points = torch.cat([POINTS, torch.tensor([[0.0, -1.0]])])
    prototypes = torch.cat([PROTOTYPES, torch.zeros(1, 2)])
    loss, excluded = prototype_infonce(points, torch.cat([TARGETS, torch.tensor([31])]), prototypes,
                                       torch.cat([PROTOTYPE_CODES, torch.tensor([-1])]), temperature=0.5)
    assert loss.item() == pytest.approx(_three_point_loss(), abs=1e-6)
    assert excluded.item() == 1 and excluded.dtype == torch.int64


def test_all_excluded_batch_gives_zero_with_a_graph():
    points = POINTS.clone().requires_grad_()
    loss, excluded = prototype_infonce(points, torch.tensor([30, 31, 29]), PROTOTYPES,
                                       torch.tensor([3, -1, 12]), temperature=0.1)
    assert loss.item() == 0.0 and excluded.item() == 3
    loss.backward()
    assert torch.equal(points.grad, torch.zeros_like(points))
    empty, _ = prototype_infonce(points, TARGETS, PROTOTYPES, torch.full((3,), -1), temperature=0.1)
    assert empty.item() == 0.0 and empty.requires_grad


def test_prototype_infonce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="differ in width"):
        prototype_infonce(POINTS, TARGETS, torch.zeros(3, 4), PROTOTYPE_CODES)
    with pytest.raises(ValueError, match="target codes must be 3 integer"):
        prototype_infonce(POINTS, TARGETS.float(), PROTOTYPES, PROTOTYPE_CODES)
    with pytest.raises(ValueError, match="temperature"):
        prototype_infonce(POINTS, TARGETS, PROTOTYPES, PROTOTYPE_CODES, temperature=0.0)


def test_batch_mean_prototypes_one_per_combination():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], requires_grad=True)
    prototypes, codes = batch_mean_prototypes(points, torch.tensor([5, 5, 2, 5]))
    assert codes.tolist() == [5, -1, 2, -1]
    # combination 5: mean of (1,0), (0,1), (-1,0) = (0, 1/3), normalized (0, 1)
    assert torch.allclose(prototypes[0], torch.tensor([0.0, 1.0]), atol=1e-6)
    assert torch.allclose(prototypes[2], torch.tensor([0.6, 0.8]), atol=1e-6)
    loss, excluded = prototype_infonce(points, torch.tensor([5, 5, 2, 5]), prototypes, codes, temperature=1.0)
    # two live prototypes, (0,1) for code 5 and (0.6,0.8) for code 2; logits are the cosines
    expected = (_cross_entropy([0.0, 0.6], 0) + _cross_entropy([1.0, 0.8], 0) + _cross_entropy([0.8, 1.0], 1)
                + _cross_entropy([0.0, -0.6], 0)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6) and excluded.item() == 0
    loss.backward()  # the literal form keeps the prototypes' gradients
    assert points.grad.abs().sum() > 0


def test_supervised_contrastive_by_hand():
    # Rows 0 and 1 share their target; row 2 shares only ones with them, row 3 is alone: only
    # anchors 0 and 1 count, each with one positive, every other row in the denominator.
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    targets = torch.tensor([[1.0, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    loss = supervised_contrastive(z, targets, temperature=0.5)
    anchor_0 = _cross_entropy([1.2, 0.0, -1.2], 0)  # cosines to rows 1, 2, 3 over 0.5
    anchor_1 = _cross_entropy([1.2, 1.6, 0.56], 0)  # to rows 0, 2, 3
    assert loss.item() == pytest.approx((anchor_0 + anchor_1) / 2, abs=1e-6)


def test_supervised_contrastive_averages_over_positives():
    # Three identical targets: each anchor has two positives and the same two rows in its denominator.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    loss = supervised_contrastive(z, torch.ones(3, 5), temperature=1.0)
    anchor_0 = (_cross_entropy([0.0, -1.0], 0) + _cross_entropy([0.0, -1.0], 1)) / 2  # cosines 0 and -1
    # anchor 1 sees cosines 0 and 0; anchor 2 mirrors anchor 0
    per_anchor = [anchor_0, math.log(2.0), anchor_0]
    assert loss.item() == pytest.approx(sum(per_anchor) / 3, abs=1e-6)


def test_supervised_contrastive_without_positives_is_zero_with_a_graph():
    z = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    loss = supervised_contrastive(z, torch.eye(3, 5), temperature=0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    single = supervised_contrastive(z[:1], torch.ones(1, 5))
    assert single.item() == 0.0 and not torch.isnan(single)


def test_identity_and_separation_by_hand():
    flowed = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # rows: ||(0.4, -0.8)||^2 = 0.8 and 0 -> mean 0.4
    assert identity_loss(flowed, torch.tensor([[0.6, 0.8], [0.0, 1.0]])).item() == pytest.approx(0.4)
    # differences (1, -1) and (0, 0): squares sum to 2 over 4 elements
    assert separation_loss(flowed, torch.tensor([[0.0, 1.0], [0.0, 1.0]])).item() == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="both have shape"):
        identity_loss(flowed, torch.zeros(3, 2))


def _field_and_inputs(output_init_std: float = 0.5):
    torch.manual_seed(0)
    field = AttributeField(embedding_dim=6, num_attributes=5, hidden=16, depth=2,
                           output_init_std=output_init_std)
    z = F.normalize(torch.randn(4, 6), dim=1)
    source = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    return field, z, source, 1 - source


def test_field_layers_and_small_output():
    field = AttributeField(embedding_dim=64, num_attributes=5, output_init_std=1e-3)
    kinds = [type(layer).__name__ for layer in field.hidden]
    assert kinds == ["Linear", "LayerNorm", "ReLU"] * 2
    assert field.hidden[0].in_features == 64 + 2 * 5 and field.hidden[0].out_features == 256
    assert torch.equal(field.output.bias, torch.zeros(64))
    assert field.output.weight.std().item() == pytest.approx(1e-3, rel=0.1)


def test_field_rejects_bad_shapes():
    field, z, source, target = _field_and_inputs()
    with pytest.raises(ValueError, match=r"z \[N, 6\]"):
        field(z[:, :5], source, target)
    with pytest.raises(ValueError, match=r"y_target \(3, 5\)"):
        field(z, source, target[:3])


def test_sphere_steps_keep_unit_norm_and_path_starts_at_z():
    field, z, source, target = _field_and_inputs()
    final, path = flow_on_sphere(field, z, source, target, steps=7, alpha=0.3, return_path=True)
    assert path.shape == (8, 4, 6)
    assert torch.equal(path[0], z) and torch.equal(path[-1], final)
    assert torch.allclose(path.norm(dim=2), torch.ones(8, 4), atol=1e-6)
    assert (final - z).norm(dim=1).min() > 1e-3  # the field did move the points
    assert torch.equal(flow_on_sphere(field, z, source, target, steps=7, alpha=0.3), final)


def test_zero_field_leaves_z_unchanged():
    field, z, source, target = _field_and_inputs(output_init_std=0.0)
    assert torch.allclose(flow_on_sphere(field, z, source, target, steps=10), z, atol=1e-6)


def test_gradients_reach_the_field_through_every_step():
    field, z, source, target = _field_and_inputs()
    step_gradients = []

    def record_gradient(module, inputs, v):
        v.register_hook(step_gradients.append)

    field.register_forward_hook(record_gradient)
    final = flow_on_sphere(field, z, source, target, steps=5, alpha=0.1)
    (final @ torch.ones(6)).sum().backward()
    assert len(step_gradients) == 5
    assert all(gradient.abs().sum() > 0 for gradient in step_gradients)
    assert field.hidden[0].weight.grad.abs().sum() > 0


def test_flow_rejects_no_steps():
    field, z, source, target = _field_and_inputs()
    with pytest.raises(ValueError, match="steps >= 1"):
        flow_on_sphere(field, z, source, target, steps=0)
