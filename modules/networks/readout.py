"""Spec 004's readout ``g(V)`` ("Readouts & Utilities", P2): mean/variance pooling of the latent grid, then
an MLP to the embedding ``z`` that InfoNCE compares between paraphrases."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def pooled_mean_variance(v: torch.Tensor, pool_levels: Sequence[int]) -> torch.Tensor:
    """Per-channel mean and variance of ``v: [B, C, H, W]`` over an ``n × n`` grid of cells for each
    level ``n``: ``[B, 2 * C * sum(n^2)]``.

    A cell's variance is ``E[v^2] - E[v]^2`` over the cell (adaptive average pooling of ``v`` and
    ``v^2``). Per level the features are ordered ``[means, variances]``, each channel-major then
    row-major over cells; level 1 is the spec's whole-map mean and variance.
    """
    features = []
    for level in pool_levels:
        mean = F.adaptive_avg_pool2d(v, level)
        variance = F.adaptive_avg_pool2d(v.square(), level) - mean.square()
        features += [rearrange(mean, "b c h w -> b (c h w)"), rearrange(variance, "b c h w -> b (c h w)")]
    return torch.cat(features, dim=1)


class MeanVarReadout(nn.Module):
    """``g(V): [B, C, H, W] -> [B, out_dim]``, ``pooled_mean_variance`` then ``Linear -> GELU -> Linear``.

    ``pool_levels=(1,)`` is the spec's literal readout; extra levels (e.g. ``(1, 2, 4)``) also keep
    where in the grid the statistics come from. With ``standardize_maps`` every map is first brought to
    zero mean and unit variance (``standardized_maps``), so ``z`` can only depend on the layout: each
    channel's brightness and contrast, which a spatial shuffle keeps, are invisible to it.
    """

    def __init__(self, channels: int, out_dim: int = 256, hidden_dim: int = 512,
                 pool_levels: Sequence[int] = (1,), standardize_maps: bool = False) -> None:
        super().__init__()
        if not pool_levels or any(level < 1 for level in pool_levels):
            raise ValueError(f"pool_levels must be a non-empty list of positive ints, got {pool_levels}")
        if standardize_maps and max(pool_levels) == 1:
            raise ValueError("standardize_maps leaves nothing for pool level 1 to read: add a level above 1 "
                             f"to pool_levels, got {tuple(pool_levels)}")
        self.channels = channels
        self.pool_levels = tuple(pool_levels)
        self.standardize_maps = standardize_maps
        feature_dim = 2 * channels * sum(level * level for level in self.pool_levels)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() != 4 or v.shape[1] != self.channels:
            raise ValueError(f"v must have shape [B, {self.channels}, H, W], got {tuple(v.shape)}")
        if max(self.pool_levels) > min(v.shape[2:]):
            raise ValueError(f"pool level {max(self.pool_levels)} has more cells than v's grid "
                             f"{tuple(v.shape[2:])}")
        return self.mlp(pooled_mean_variance(standardized_maps(v) if self.standardize_maps else v, self.pool_levels))


def standardized_maps(v: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each map of ``v [B, C, H, W]`` minus its mean over the grid, over its standard deviation (plus ``eps``)."""
    centred = v - v.mean(dim=(-2, -1), keepdim=True)
    return centred / (centred.square().mean(dim=(-2, -1), keepdim=True) + eps).sqrt()
