"""Soft-target InfoNCE (spec 002) against hand-computed matrices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modules.losses.soft_targets import (
    TARGET_MODES,
    alignment_targets,
    label_aware_targets,
    similarity_targets,
    soft_cross_entropy,
    symmetric_infonce,
)

LABELS = torch.tensor([0, 1, 0, 2])
# Three texts on axes and a fourth between the first two: t0 . t3 = t1 . t3 = 1/sqrt(2).
TEXTS = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), dim=1)


def test_label_aware_counts_same_label_pairs():
    expected = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])
    assert torch.allclose(label_aware_targets(LABELS), expected)


def test_pairwise_targets_by_hand():
    # Row 1 (text [0, 1, 0]) has similarities [0, 1, 0, 1/sqrt 2] with the batch; temperature 0.5.
    row = torch.tensor([0.0, 1.0, 0.0, 1 / math.sqrt(2)]) / 0.5
    expected = row.exp() / row.exp().sum()
    assert torch.allclose(similarity_targets(TEXTS, TEXTS, 0.5)[1], expected, atol=1e-6)


def test_prototype_targets_use_the_prototype_of_each_label():
    # Item 0's prototype is the text of item 3: its targets are softmax([c, c, c, 1] / T), c = 1/sqrt 2.
    prototypes = TEXTS[[3, 1, 3, 2]]
    targets = alignment_targets("prototype", LABELS, TEXTS, prototypes, soft_temperature=1.0,
                                soft_target_weight=1.0)
    c = 1 / math.sqrt(2)
    row = torch.tensor([c, c, c, 1.0]).exp()
    assert torch.allclose(targets[0], row / row.sum(), atol=1e-6)


@pytest.mark.parametrize("mode", TARGET_MODES)
def test_every_mode_gives_rows_summing_to_one(mode):
    targets = alignment_targets(mode, LABELS, TEXTS, TEXTS[[3, 1, 3, 2]], soft_temperature=0.1)
    assert targets.shape == (4, 4)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    assert (targets >= 0).all()


def test_soft_modes_blend_with_hard_by_the_soft_target_weight():
    soft = label_aware_targets(LABELS)
    blended = alignment_targets("label_aware", LABELS, TEXTS, soft_target_weight=0.25)
    assert torch.allclose(blended, 0.75 * torch.eye(4) + 0.25 * soft)
    assert torch.equal(alignment_targets("hard", LABELS, TEXTS, soft_target_weight=0.9), torch.eye(4))


def test_hybrid_blends_pairwise_and_prototype_by_the_prototype_weight():
    prototypes = TEXTS[[3, 1, 3, 2]]
    pairwise = similarity_targets(TEXTS, TEXTS, 0.2)
    prototype = similarity_targets(prototypes, TEXTS, 0.2)
    hybrid = alignment_targets("hybrid", LABELS, TEXTS, prototypes, 0.2, soft_target_weight=1.0, prototype_weight=0.3)
    assert torch.allclose(hybrid, 0.7 * pairwise + 0.3 * prototype)


def test_hard_target_loss_equals_plain_cross_entropy_both_ways():
    generator = torch.Generator().manual_seed(0)
    imu = F.normalize(torch.randn(4, 3, generator=generator), dim=1)
    logits = 10.0 * imu @ TEXTS.T
    plain = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    assert torch.allclose(symmetric_infonce(imu, TEXTS, torch.eye(4), 10.0), plain)
    assert torch.allclose(soft_cross_entropy(logits, torch.eye(4)), F.cross_entropy(logits, torch.arange(4)))


def test_text_to_imu_direction_reads_renormalized_columns():
    # Targets whose columns do not sum to one: the text-to-IMU rows are the columns, renormalized.
    imu = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0]]), dim=1)
    targets = label_aware_targets(torch.tensor([0, 0, 1, 1])) * 0.5 + torch.eye(4) * 0.5
    targets[0] = torch.tensor([0.7, 0.3, 0.0, 0.0])
    logits = 3.0 * imu @ TEXTS.T
    columns = targets.T / targets.T.sum(dim=1, keepdim=True)
    by_hand = 0.5 * (-(targets * logits.log_softmax(1)).sum(1).mean() - (columns * logits.T.log_softmax(1)).sum(1).mean())
    assert torch.allclose(symmetric_infonce(imu, TEXTS, targets, 3.0), by_hand)


def test_identity_targets_cannot_be_met_by_duplicate_texts_same_label_ones_can():
    # Two windows of one activity with the same text, embedded on it: cross-entropy minus the target's
    # entropy (the KL divergence) is log 2 per row for the identity target and 0 for the same-label one.
    texts = TEXTS[[0, 0, 1, 1]]
    same_label = label_aware_targets(torch.tensor([0, 0, 1, 1]))
    hard = symmetric_infonce(texts, texts, torch.eye(4), 50.0)
    label_aware = symmetric_infonce(texts, texts, same_label, 50.0)
    assert hard == pytest.approx(math.log(2), abs=1e-4)
    assert label_aware - math.log(2) == pytest.approx(0.0, abs=1e-4)  # the entropy of [1/2, 1/2] rows


def test_bad_mode_and_missing_prototypes_are_errors():
    with pytest.raises(ValueError, match="target mode"):
        alignment_targets("soft", LABELS, TEXTS)
    with pytest.raises(ValueError, match="prototype"):
        alignment_targets("prototype", LABELS, TEXTS)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        symmetric_infonce(TEXTS, TEXTS[:, :2], torch.eye(4), 1.0)
