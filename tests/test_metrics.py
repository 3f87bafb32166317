"""Clustering metrics: permutation invariance, agreement with scikit-learn, occupancy."""

import itertools
import math

import pytest
import torch
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

from modules.metrics import (
    ClusterOccupancy,
    HungarianAccuracy,
    expected_mutual_information,
    label_agreement,
    label_metrics,
)


def test_a_permuted_labelling_scores_perfectly():
    target = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(0))
    permutation = torch.tensor([3, 0, 4, 1, 2])
    scores = label_metrics(num_clusters=5, num_classes=5)(permutation[target], target)
    for name in ("acc", "nmi", "ari", "ami"):
        assert scores[name].item() == pytest.approx(1.0, abs=1e-5), name


def test_matches_scikit_learn_on_noisy_clusterings():
    generator = torch.Generator().manual_seed(1)
    target = torch.randint(0, 6, (500,), generator=generator)
    preds = torch.where(torch.rand(500, generator=generator) < 0.6, target, torch.randint(0, 8, (500,), generator=generator))
    scores = label_metrics(num_clusters=8, num_classes=6)(preds, target)
    assert scores["nmi"].item() == pytest.approx(normalized_mutual_info_score(target, preds), abs=1e-5)
    assert scores["ari"].item() == pytest.approx(adjusted_rand_score(target, preds), abs=1e-5)
    assert scores["ami"].item() == pytest.approx(adjusted_mutual_info_score(target, preds), abs=1e-5)
    assert 0.5 < scores["acc"].item() < 0.9


def test_expected_mutual_information_of_a_single_cluster_is_zero():
    assert expected_mutual_information(torch.tensor([[5.0, 3.0]])).item() == 0.0


def test_cluster_accuracy_by_hand():
    # Clusters {0,0,1} vs classes {1,1,1}: the best matching maps cluster 0 -> class 1: 2 of 3 right.
    scores = label_metrics(num_clusters=2, num_classes=2)(torch.tensor([0, 0, 1]), torch.tensor([1, 1, 1]))
    assert scores["acc"].item() == pytest.approx(2 / 3)


def test_hungarian_accuracy_by_hand_with_more_clusters_than_classes():
    # contingency (clusters x classes): [[3, 1], [0, 2], [2, 0]]; the best one-to-one matching takes
    # cluster 0 -> class 0 and cluster 1 -> class 1: 3 + 2 of 8 items; cluster 2 stays unmatched
    preds = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    target = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0])
    accuracy = HungarianAccuracy(num_clusters=3, num_classes=2)
    accuracy.update(preds[:5], target[:5])
    accuracy.update(preds[5:], target[5:])  # the table accumulates over batches
    assert accuracy.contingency.tolist() == [[3, 1], [0, 2], [2, 0]]
    assert accuracy.compute().item() == pytest.approx(5 / 8)


def test_hungarian_accuracy_rejects_a_cluster_beyond_the_table():
    with pytest.raises(IndexError, match="out of bounds"):
        HungarianAccuracy(num_clusters=2, num_classes=2).update(torch.tensor([0, 3]), torch.tensor([1, 1]))


@pytest.mark.parametrize("seed, n, clusters, classes, recorded", [
    # recorded with torchmetrics' ClusterAccuracy (square table of max(clusters, classes)), which this replaces
    (3, 300, 6, 4, 0.6066666841506958),
    (4, 500, 5, 8, 0.33399999141693115),
    (5, 400, 10, 10, 0.5950000286102295),
])
def test_hungarian_accuracy_equals_the_best_matching_and_the_recorded_values(seed, n, clusters, classes, recorded):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (n,), generator=generator)
    preds = torch.where(torch.rand(n, generator=generator) < 0.5, target % clusters,
                        torch.randint(0, clusters, (n,), generator=generator))
    accuracy = HungarianAccuracy(clusters, classes)(preds, target).item()
    assert accuracy == pytest.approx(recorded, abs=1e-6)
    if max(clusters, classes) <= 8:  # every one-to-one matching, by brute force
        table = torch.zeros(clusters, classes)
        table.index_put_((preds, target), torch.ones(n), accumulate=True)
        size = max(clusters, classes)
        square = torch.zeros(size, size)
        square[:clusters, :classes] = table
        best = max(square[torch.arange(size), torch.tensor(perm)].sum().item()
                   for perm in itertools.permutations(range(size)))
        assert accuracy == pytest.approx(best / n, abs=1e-6)


def test_occupancy_counts_used_clusters_and_shares():
    occupancy = ClusterOccupancy(num_clusters=5)
    occupancy.update(torch.tensor([0, 0, 0, 1]))
    occupancy.update(torch.tensor([1, 3]))
    result = occupancy.compute()
    assert result["clusters_used"].item() == 3
    assert result["largest_cluster"].item() == pytest.approx(0.5)
    assert result["smallest_cluster"].item() == 0.0  # clusters 2 and 4 are empty


def test_label_agreement_by_hand():
    clusters, labels = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 1, 0, 0, 0, 0])
    scores = label_agreement(clusters, labels)
    # ARI: pair counts sum C(n_ij, 2) = 3, rows 1 + 6 = 7, columns 3 x 1 = 3, C(6, 2) = 15:
    # (3 - 7 * 3 / 15) / ((7 + 3) / 2 - 7 * 3 / 15) = 1.6 / 3.6 = 4/9
    assert scores["ari"] == pytest.approx(4 / 9, abs=1e-6)
    # clusters refine the labels, so MI = H(labels) = ln 3 - (2/3) ln 2; NMI = MI / mean(H(labels), ln 3)
    entropy_labels = math.log(3) - 2 / 3 * math.log(2)
    assert scores["nmi"] == pytest.approx(entropy_labels / ((entropy_labels + math.log(3)) / 2), abs=1e-6)
    assert label_agreement(labels + 5, labels) == {"ari": pytest.approx(1.0), "nmi": pytest.approx(1.0)}
