"""Exponential moving average of a network into its teacher copy."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source`` for parameters; buffers
    (batch-norm statistics) are copied, as the teacher never sees training batches itself."""
    torch._foreach_lerp_(list(target.parameters()), [p.detach() for p in source.parameters()], 1.0 - momentum)
    for target_buffer, source_buffer in zip(target.buffers(), source.buffers(), strict=True):
        target_buffer.copy_(source_buffer)
