"""Exponential moving average of a network into its teacher copy."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float, skip: torch.Tensor | None = None) -> None:
    """``target <- momentum * target + (1 - momentum) * source`` for parameters; buffers
    (batch-norm statistics) are copied, as the teacher never sees training batches itself.

    ``skip`` (a boolean tensor, decided on the device) leaves the target as it is where True, so a
    skipped step needs no host sync.
    """
    targets = list(target.parameters())
    weight = 1.0 - momentum
    if skip is not None:  # a weight of 0 keeps the target exactly; lerp's result is bitwise the scalar form's
        weight = [torch.where(skip, 0.0, weight).to(targets[0].dtype)] * len(targets)
    torch._foreach_lerp_(targets, [p.detach() for p in source.parameters()], weight)
    for target_buffer, source_buffer in zip(target.buffers(), source.buffers(), strict=True):
        target_buffer.copy_(source_buffer if skip is None else torch.where(skip, target_buffer, source_buffer))
