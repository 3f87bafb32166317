"""Zero-shot metrics by nearest label text (issue 10, "Evaluation"), against hand-counted cases."""

from __future__ import annotations

import pytest
import torch

from modules.zero_shot import harmonic_mean, zero_shot_metrics

# Label table of four activities; windows carry labels 0, 1, 3 (2 is in the table, not in this split).
LABELS = torch.tensor([0, 0, 1, 1, 3, 3])
SCORES = torch.tensor([
    [0.9, 0.1, 0.0, 0.2],  # 0 -> 0 right
    [0.1, 0.8, 0.0, 0.2],  # 0 -> 1 wrong, 0 only third among the candidates (R@2 miss)
    [0.0, 0.7, 0.9, 0.1],  # 1 -> 1 right: label 2 is no candidate, so its 0.9 does not count
    [0.0, 0.2, 0.0, 0.6],  # 1 -> 3 wrong, 1 second
    [0.0, 0.1, 0.0, 0.5],  # 3 -> 3 right
    [0.3, 0.1, 0.0, 0.5],  # 3 -> 3 right
])


def test_candidates_are_the_labels_the_windows_carry():
    metrics = zero_shot_metrics(SCORES, LABELS, seen=torch.tensor([0, 1, 2, 3]))
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["recall_at_1"] == pytest.approx(4 / 6)
    assert metrics["recall_at_2"] == pytest.approx(5 / 6)
    # per class F1: class 0 p=1 r=1/2 -> 2/3; class 1 p=1/2 r=1/2 -> 1/2; class 3 p=2/3 r=1 -> 4/5
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)
    assert "unseen_accuracy" not in metrics and "harmonic_mean" not in metrics


def test_unseen_labels_get_unseen_only_and_generalized_accuracy():
    metrics = zero_shot_metrics(SCORES, LABELS, seen=torch.tensor([0]))
    # unseen 1 and 3 among themselves: rows 2, 3, 4, 5 -> 1, 3, 3, 3: three right of four
    assert metrics["unseen_accuracy"] == pytest.approx(3 / 4)
    # over all candidates {0, 1, 3}: seen windows 1/2 right, unseen windows 3/4 right
    assert metrics["seen_accuracy_all"] == pytest.approx(1 / 2)
    assert metrics["unseen_accuracy_all"] == pytest.approx(3 / 4)
    assert metrics["harmonic_mean"] == pytest.approx(harmonic_mean(0.5, 0.75)) == pytest.approx(0.6)


def test_a_single_unseen_label_has_no_unseen_only_accuracy():
    metrics = zero_shot_metrics(SCORES, LABELS, seen=torch.tensor([0, 1]))
    assert "unseen_accuracy" not in metrics  # one candidate would be right by construction
    assert metrics["unseen_accuracy_all"] == pytest.approx(1.0)
