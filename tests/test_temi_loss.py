"""TEMI loss terms against values computed by hand."""

import math

import pytest
import torch

from modules.losses.temi import (
    batch_entropy_regularizer,
    beta_pmi,
    spec_beta_mi,
    teacher_pair_weight,
    temi_head_losses,
    updated_marginal,
)


def logp(*probs):
    return torch.tensor(probs).log()


def test_beta_one_is_negative_pointwise_mutual_information():
    # sum_k q_s q_t / p = (0.8*0.8 + 0.2*0.2) / 0.5 = 1.36
    loss = beta_pmi(logp(0.8, 0.2), logp(0.8, 0.2), logp(0.5, 0.5), beta=1.0)
    assert loss.item() == pytest.approx(-math.log(1.36), abs=1e-6)


def test_beta_pmi_with_beta_half():
    # (sqrt(.64) + sqrt(.04)) / 0.5 = 2
    loss = beta_pmi(logp(0.8, 0.2), logp(0.8, 0.2), logp(0.5, 0.5), beta=0.5)
    assert loss.item() == pytest.approx(-math.log(2.0), abs=1e-6)


def test_beta_pmi_uses_the_marginal():
    # q_s q_t = (.45, .05); / p = (.45/.9, .05/.1) = (.5, .5) -> -log 1 = 0
    loss = beta_pmi(logp(0.5, 0.5), logp(0.9, 0.1), logp(0.9, 0.1), beta=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_spec_form_by_hand():
    # ratio = q_s q_t / p = (1.28, 0.08); weight = ratio**1 * p = (.64, .04)
    # loss = -(.64 log 1.28 + .04 log .08)
    loss = spec_beta_mi(logp(0.8, 0.2), logp(0.8, 0.2), logp(0.5, 0.5), beta=1.0)
    expected = -(0.64 * math.log(1.28) + 0.04 * math.log(0.08))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_teacher_weight_averages_heads():
    # head 0: .9*.5 + .1*.5 = .5 ; head 1: .5*.5+.5*.5 = .5 -> .5 ; second item: 1*1 and .5 -> .75
    teacher = torch.tensor(
        [
            [[[0.9, 0.1], [1.0 - 1e-9, 1e-9]], [[0.5, 0.5], [0.5, 0.5]]],  # view 0: heads x items
            [[[0.5, 0.5], [1.0 - 1e-9, 1e-9]], [[0.5, 0.5], [0.5, 0.5]]],  # view 1
        ]
    ).log()
    assert teacher_pair_weight(teacher).tolist() == pytest.approx([0.5, 0.75], abs=1e-6)


def test_head_loss_is_weighted_and_symmetrized():
    s0, s1 = (0.8, 0.2), (0.6, 0.4)
    t0, t1 = (0.7, 0.3), (0.9, 0.1)
    student = torch.tensor([[[s0]], [[s1]]]).log()  # [V=2, H=1, B=1, K=2]
    teacher = torch.tensor([[[t0]], [[t1]]]).log()
    marginal = torch.tensor([[0.4, 0.6]])
    loss = temi_head_losses(student, teacher, marginal.log(), beta=1.0)

    def pmi(s, t):
        return -math.log(s[0] * t[0] / 0.4 + s[1] * t[1] / 0.6)

    weight = t0[0] * t1[0] + t0[1] * t1[1]
    expected = weight * (pmi(s0, t1) + pmi(s1, t0)) / 2
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_only_the_student_gets_gradients():
    student = torch.randn(2, 3, 5, 4).log_softmax(-1).requires_grad_()
    teacher = torch.randn(2, 3, 5, 4).log_softmax(-1).requires_grad_()
    temi_head_losses(student, teacher, torch.full((3, 4), 0.25).log(), beta=0.6).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_entropy_regularizer_is_lowest_for_balanced_batches():
    balanced = torch.tensor([[0.9, 0.1], [0.1, 0.9]])  # batch mean (.5, .5)
    collapsed = torch.tensor([[0.9, 0.1], [0.9, 0.1]])  # batch mean (.9, .1)
    as_views = lambda p: p.log()[None, None].expand(2, 1, 2, 2)  # noqa: E731
    assert batch_entropy_regularizer(as_views(balanced)).item() == pytest.approx(math.log(0.5), abs=1e-6)
    expected = 0.9 * math.log(0.9) + 0.1 * math.log(0.1)
    assert batch_entropy_regularizer(as_views(collapsed)).item() == pytest.approx(expected, abs=1e-6)


def test_marginal_is_an_exponential_moving_average():
    updated = updated_marginal(torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]]), momentum=0.9)
    assert updated[0].tolist() == pytest.approx([0.55, 0.45])
