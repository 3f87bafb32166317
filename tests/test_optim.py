"""Optimizer groups, learning-rate and momentum schedules, and the teacher EMA, by hand."""

import pytest
import torch

from modules.ema import ema_update
from modules.networks.cluster_heads import TEMIHeads
from modules.optim import cosine_ramp, decay_groups, linear_ramp, warmup_cosine_factor


def test_no_decay_on_biases_and_weight_norms():
    heads = TEMIHeads(8, 3, num_heads=2, hidden_dim=16, bottleneck_dim=4)
    decay, no_decay = decay_groups(heads, 1e-4)
    names = {id(p): n for n, p in heads.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"hidden.weight", "bottleneck.weight", "last_layer.direction"}
    assert {names[id(p)] for p in no_decay["params"]} == {"hidden.bias", "bottleneck.bias", "last_layer.norm"}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (1e-4, 0.0)


def test_warmup_then_cosine():
    assert warmup_cosine_factor(0, 10, 110, 0.1) == 0.0
    assert warmup_cosine_factor(5, 10, 110, 0.1) == 0.5
    assert warmup_cosine_factor(10, 10, 110, 0.1) == 1.0
    assert warmup_cosine_factor(60, 10, 110, 0.1) == pytest.approx(0.55)  # half way down the cosine
    assert warmup_cosine_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(60, 10, 110, 1.0) == 1.0  # min_lr == lr: constant, as the official runs


def test_momentum_and_temperature_ramps():
    assert cosine_ramp(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_ramp(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_ramp(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert linear_ramp(0, 10, 0.04, 0.1) == 0.04 and linear_ramp(5, 10, 0.04, 0.1) == pytest.approx(0.07)
    assert linear_ramp(30, 10, 0.04, 0.1) == 0.1


def test_ema_moves_parameters_and_copies_buffers():
    student, teacher = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.0)
        student.running_mean.fill_(3.0)
    ema_update(teacher, student, momentum=0.9)
    assert teacher.weight.tolist() == pytest.approx([0.1, 0.1])
    assert teacher.running_mean.tolist() == [3.0, 3.0]


def test_ema_skip_decided_on_the_device_keeps_the_teacher_exactly():
    student, teacher = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.0)
        student.running_mean.fill_(3.0)
    ema_update(teacher, student, momentum=0.9, skip=torch.tensor(True))
    assert teacher.weight.tolist() == [0.0, 0.0] and teacher.running_mean.tolist() == [0.0, 0.0]
    ema_update(teacher, student, momentum=0.9, skip=torch.tensor(False))
    assert teacher.weight.tolist() == pytest.approx([0.1, 0.1]) and teacher.running_mean.tolist() == [3.0, 3.0]
