"""Attribute-transfer metrics and baselines (spec 001, issue 11) on hand-made embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modules.attribute_transfer import (
    class_mean_directions,
    fit_probes,
    linear_steering,
    nearest_with_targets,
    neighbour_metrics,
    probe_metrics,
    transfer_metrics,
)

NAMES = ["a", "b"]


def axis_data(num: int = 200, seed: int = 0):
    """Two attributes on two axes of a 4-D sphere: attribute k set <=> coordinate k positive."""
    generator = torch.Generator().manual_seed(seed)
    attributes = torch.randint(0, 2, (num, 2), generator=generator).float()
    z = torch.randn(num, 4, generator=generator) * 0.3
    z[:, :2] += (attributes * 2 - 1)
    return F.normalize(z, dim=1), attributes


def test_probes_read_the_attributes_of_real_embeddings():
    z, attributes = axis_data()
    probes = fit_probes(z, attributes)
    metrics = probe_metrics(z, attributes, attributes, *probes, NAMES)
    assert metrics["kept_accuracy"] > 0.97 and metrics["all_correct"] > 0.95
    assert metrics["flipped_accuracy"] != metrics["flipped_accuracy"]  # NaN: nothing flipped


def test_flipped_and_kept_are_counted_apart_by_hand():
    weights, biases = torch.eye(2, 4), torch.zeros(2)  # the probes read the signs of the first two coordinates
    z = torch.tensor([[1.0, 1, 0, 0], [1, -1, 0, 0]])
    attributes = torch.tensor([[0.0, 1], [1, 0]])
    targets = torch.tensor([[1.0, 1], [0, 0]])  # row 0 flips a (right), row 1 flips a (wrong); b kept, both right
    metrics = probe_metrics(F.normalize(z, dim=1), attributes, targets, weights, biases, NAMES)
    assert metrics["flipped_accuracy"] == pytest.approx(0.5)
    assert metrics["kept_accuracy"] == pytest.approx(1.0)
    assert metrics["all_correct"] == pytest.approx(0.5)
    assert metrics["flipped_accuracy/a"] == pytest.approx(0.5)


def test_a_collapse_onto_one_point_has_low_uniqueness():
    z, attributes = axis_data()
    collapsed = z[:1].expand(len(z), -1)
    assert neighbour_metrics(collapsed, attributes, z, attributes)["nn_uniqueness"] == pytest.approx(1 / len(z))
    assert neighbour_metrics(z, attributes, z, attributes)["nn_uniqueness"] == pytest.approx(1.0)


def test_baselines_move_toward_the_target_attributes():
    z, attributes = axis_data()
    targets = attributes.clone()
    targets[:, 0] = 1 - targets[:, 0]
    probes = fit_probes(z, attributes)
    directions = class_mean_directions(z, attributes)
    assert directions[0, 0] > 1.0 and directions[1, 1] > 1.0  # each direction lies along its own axis
    steered = linear_steering(z, attributes, targets, directions, 1.0)
    assert probe_metrics(steered, attributes, targets, *probes, NAMES)["flipped_accuracy"] > 0.95
    nearest = nearest_with_targets(z, targets, z, attributes)
    metrics = transfer_metrics(nearest, z, attributes, targets, probes, NAMES, z, attributes)
    assert metrics["nearest_real_correct"] == pytest.approx(1.0)
    noop = transfer_metrics(z, z, attributes, targets, probes, NAMES, z, attributes, z_star=nearest)
    assert noop["nearest_real_correct"] == 0.0 and noop["movement"] == pytest.approx(0.0, abs=1e-6)
    assert noop["flipped_accuracy"] < 0.05
    assert 0.0 <= noop["counterfactual_rank"] <= 1.0


def test_a_constant_coordinate_of_real_data_does_not_steer_the_probes():
    """Real embeddings with a coordinate that never varies: a point nudged along it reads as before."""
    z, attributes = axis_data()
    z = torch.cat([z * 0.75**0.5, torch.full((len(z), 1), 0.5)], dim=1)  # unit rows, the last coordinate fixed
    probes = fit_probes(z, attributes)
    nudged = z.clone()
    nudged[:, -1] += 0.05
    before = probe_metrics(z, attributes, attributes, *probes, NAMES)["kept_accuracy"]
    after = probe_metrics(nudged, attributes, attributes, *probes, NAMES)["kept_accuracy"]
    assert after == pytest.approx(before, abs=0.02)
