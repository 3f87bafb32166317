"""Source-to-sample pairings of flow-matching batches: exact minibatch OT and OT within clusters."""

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from datamodules.couplings import ot_assignment, paired_sources, within_cluster_assignment
from datamodules.flow_data import FlowDataModule


def squared_cost(x0: torch.Tensor, x1: torch.Tensor, source: torch.Tensor) -> float:
    return float((x0[source] - x1).pow(2).sum())


def test_ot_assignment_is_the_optimal_permutation_scipy_finds():
    generator = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(12, 3, generator=generator), torch.randn(12, 3, generator=generator) + 1.0
    source = ot_assignment(x0, x1)
    assert sorted(source.tolist()) == list(range(12))  # every draw used once
    rows, columns = linear_sum_assignment(torch.cdist(x0, x1).pow(2).numpy())
    expected = torch.empty(12, dtype=torch.long)
    expected[torch.from_numpy(columns)] = torch.from_numpy(rows)
    assert torch.equal(source, expected)
    assert squared_cost(x0, x1, source) < squared_cost(x0, x1, torch.arange(12))


def test_ot_assignment_by_hand():
    # two points on a line: the crossing pairing costs (0-3)^2 + (1-2)^2 = 10, the straight one (0-2)^2 + (1-3)^2 = 8
    x0, x1 = torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0], [2.0]])
    assert torch.equal(ot_assignment(x0, x1), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"same shape to be paired, got \(2, 1\) and \(3, 1\)"):
        ot_assignment(x0, torch.zeros(3, 1))


def test_ot_within_clusters_never_pairs_across_clusters():
    generator = torch.Generator().manual_seed(1)
    clusters = torch.tensor([0, 2, 0, 1, 2, 0, 1, 2])
    x0, x1 = torch.randn(8, 2, generator=generator), torch.randn(8, 2, generator=generator)
    source = within_cluster_assignment(x0, x1, clusters)
    assert torch.equal(clusters[source], clusters) and sorted(source.tolist()) == list(range(8))
    for cluster in range(3):  # and within each cluster it is that cluster's optimal plan
        members = (clusters == cluster).nonzero().squeeze(1)
        assert torch.equal(source[members], members[ot_assignment(x0[members], x1[members])])


def test_paired_sources_reorder_the_draws_and_name_what_is_missing():
    x0, x1 = torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0], [2.0]])
    assert torch.equal(paired_sources("independent", x0, x1), x0)
    assert torch.equal(paired_sources("minibatch_ot", x0, x1), torch.tensor([[1.0], [0.0]]))
    with pytest.raises(KeyError, match="needs cluster ids: add the ClusterAssignment callback"):
        paired_sources("cluster_ot", x0, x1)
    with pytest.raises(ValueError, match="pairing must be one of"):
        paired_sources("sinkhorn", x0, x1)


def test_training_batches_flow_from_their_ot_partners():
    def first_batch(pairing):
        data = FlowDataModule(dataset="moons", num_train=256, batch_size=64, source="8gaussians", pairing=pairing, seed=0)
        data.set_cluster_assignments(torch.arange(256) % 4)
        return next(iter(data.train_dataloader())), data

    independent, data = first_batch("independent")
    for pairing in ("minibatch_ot", "cluster_ot"):
        paired, _ = first_batch(pairing)
        assert torch.equal(paired["index"], independent["index"])  # same samples, same draws, reassigned
        assert sorted(map(tuple, paired["x0"].tolist())) == sorted(map(tuple, independent["x0"].tolist()))
        x1 = data.train_split["x"][paired["index"]]
        assert (paired["x0"] - x1).pow(2).sum() < (independent["x0"] - x1).pow(2).sum()
    with pytest.raises(ValueError, match="pairing must be one of"):
        FlowDataModule(dataset="moons", pairing="exact")
