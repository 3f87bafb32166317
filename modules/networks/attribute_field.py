"""The attribute vector field ``v(z, y_source, y_target)`` of spec 001 and its flow on the unit sphere
(issue 11).

The spec moves a frozen embedding ``z`` toward the region of a target attribute vector with
``normalize(z + alpha * v)``, alpha 0.1, ten steps at inference. Its public code trained one such step
and applied ten to twenty; issue 11 trains with the K steps it applies, so ``flow_on_sphere`` is the one
place both training and evaluation take their steps from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttributeField(nn.Module):
    """The spec's MLP: ``concat(z, y_source, y_target)`` through ``depth`` blocks of Linear-LayerNorm-ReLU
    of width ``hidden``, then a Linear back to ``embedding_dim``.

    The output layer starts small (weights ``N(0, output_init_std)``, bias zero), so the untrained field
    barely moves ``z`` and the flow starts at the identity instead of a random rotation.
    """

    def __init__(self, embedding_dim: int, num_attributes: int, hidden: int = 256, depth: int = 2,
                 output_init_std: float = 1e-3) -> None:
        super().__init__()
        if embedding_dim < 1 or num_attributes < 1 or hidden < 1 or depth < 1:
            raise ValueError("an attribute field needs embedding_dim, num_attributes, hidden and depth "
                             f">= 1, got {embedding_dim}, {num_attributes}, {hidden}, {depth}")
        if output_init_std < 0:
            raise ValueError(f"output_init_std must be >= 0, got {output_init_std}")
        self.embedding_dim, self.num_attributes = embedding_dim, num_attributes
        layers, width = [], embedding_dim + 2 * num_attributes
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.ReLU()]
            width = hidden
        self.hidden = nn.Sequential(*layers)
        self.output = nn.Linear(width, embedding_dim)
        nn.init.normal_(self.output.weight, std=output_init_std)
        nn.init.zeros_(self.output.bias)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, num_attributes={self.num_attributes}"

    def forward(self, z: torch.Tensor, y_source: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
        """``v [N, embedding_dim]`` for ``z [N, embedding_dim]`` and attribute rows
        ``[N, num_attributes]``."""
        expected = (len(z), self.num_attributes)
        if (z.dim() != 2 or z.shape[1] != self.embedding_dim
                or y_source.shape != expected or y_target.shape != expected):
            raise ValueError(f"the attribute field expects z [N, {self.embedding_dim}] and y_source, "
                             f"y_target [N, {self.num_attributes}], got z {tuple(z.shape)}, "
                             f"y_source {tuple(y_source.shape)}, y_target {tuple(y_target.shape)}")
        dtype = self.output.weight.dtype  # bf16 weights under ``bf16-true`` take float32 embeddings
        inputs = torch.cat([z.to(dtype), y_source.to(dtype), y_target.to(dtype)], dim=1)
        return self.output(self.hidden(inputs))


def flow_on_sphere(field: nn.Module, z: torch.Tensor, y_source: torch.Tensor, y_target: torch.Tensor,
                   steps: int = 10, alpha: float = 0.1,
                   return_path: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``steps`` Euler steps ``z <- normalize(z + alpha * v(z, y_source, y_target))`` (spec: alpha 0.1, K 10).

    Each step is differentiable, so a loss on the final point trains the field through all K steps
    (issue 11: train with the K that is applied). The steps run in float32. Returns the final point
    ``[N, D]``, or with ``return_path`` also the path ``[K + 1, N, D]`` whose first point is ``z``.
    """
    if steps < 1 or alpha <= 0:
        raise ValueError(f"the flow needs steps >= 1 and alpha > 0, got steps={steps}, alpha={alpha}")
    point = z.float()
    path = [point]
    for _ in range(steps):
        point = F.normalize(point + alpha * field(point, y_source, y_target).float(), dim=1)
        path.append(point)
    return (point, torch.stack(path)) if return_path else point
