"""The role score of ``benchmarks/latent_content.py``: which color is the subject of which relation."""

from __future__ import annotations

import pytest
import torch

from benchmarks.latent_content import FAMILIES, SUBJECTS, content_labels, role_accuracy, role_pairs


def test_the_inverse_voice_names_the_same_subject_and_one_colored_relations_are_left_out():
    sentences = ["a red ball is on a blue cube.", "a blue cube is under a red ball.",
                 "two red balls are on a red cube.", "a green ring is left of a red ball."]
    rows, subject, reference = role_pairs(sentences)
    assert rows.tolist() == [0, 1, 3]  # the third relation's groups are both red
    assert [SUBJECTS[i] for i in subject] == [("on", "red"), ("on", "red"), ("left_of", "green")]
    assert [SUBJECTS[i] for i in reference] == [("on", "blue"), ("on", "blue"), ("left_of", "red")]
    labels = content_labels(sentences)[:, FAMILIES["subject"]]
    assert labels[0].nonzero().flatten().tolist() == [SUBJECTS.index(("on", "red"))]
    assert torch.equal(labels[0], labels[1])


def test_role_accuracy_counts_the_subject_above_the_reference_and_ties_as_half():
    sentences = ["a red ball is on a blue cube.", "a blue cube is under a red ball.",
                 "a green ring is left of a red ball."]
    pairs = role_pairs(sentences)
    scores = torch.zeros(content_labels(sentences).shape)
    roles = scores[:, FAMILIES["subject"]]  # a view: writing it writes scores
    roles[0, SUBJECTS.index(("on", "red"))] = 2.0  # right
    roles[1, SUBJECTS.index(("on", "blue"))] = 1.0  # wrong: the reference outscores the subject
    # the third sentence: every score 0, a tie
    assert role_accuracy(scores, pairs) == pytest.approx((1 + 0 + 0.5) / 3)


def test_a_chain_of_one_relation_gives_no_pair_that_no_score_could_order():
    # on(red, blue) and on(blue, green): (on, blue) is a true subject, so the first relation's pair is left out
    _, subject, reference = role_pairs(["a red ball is on a blue cube and the blue cube is on a green ring."])
    assert [(SUBJECTS[s], SUBJECTS[r]) for s, r in zip(subject, reference)] == [(("on", "blue"), ("on", "green"))]
    assert role_pairs(["two red balls are on a red cube."])[0].numel() == 0
