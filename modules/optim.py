"""Optimizer pieces shared by the methods: decay groups and a warmup-then-cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

# Biases, and the norm ``g`` of weight-normalized layers (2-D here, one per head and cluster).
NO_DECAY_SUFFIXES = ("bias", "norm")


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups with no decay on biases, norm parameters and 1-D tensors (DINO's
    ``get_params_groups``); frozen parameters are left out."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.dim() <= 1 or name.endswith(NO_DECAY_SUFFIXES)
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, final_factor: float) -> float:
    """Learning-rate factor: linear from 0 to 1 over ``warmup_steps``, then cosine down to
    ``final_factor`` at ``total_steps`` (DINO's ``cosine_scheduler``, per step)."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                            final_factor: float) -> dict:
    """A per-step ``LambdaLR`` in Lightning's scheduler-config form."""
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, final_factor)
    )
    return {"scheduler": schedule, "interval": "step"}


def cosine_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at ``total_steps`` along a half cosine (DINO's teacher momentum)."""
    progress = min(1.0, step / max(1, total_steps))
    return end - (end - start) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_ramp(epoch: int, ramp_epochs: int, start: float, end: float) -> float:
    """``start`` to ``end`` linearly over ``ramp_epochs`` epochs, then ``end`` (teacher temperature warmup)."""
    if epoch >= ramp_epochs:
        return end
    return start + (end - start) * epoch / ramp_epochs
