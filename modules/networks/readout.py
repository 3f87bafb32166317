"""Spec 004's readout ``g(V)`` ("Readouts & Utilities", P2): mean/variance pooling of the latent grid, then
an MLP to the embedding ``z`` that InfoNCE compares between paraphrases; or, not in the spec, learned queries
that attend over the pixels (``AttentionReadout``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from modules.networks.grid_head import CrossAttentionBlock

READOUTS = ("mean_variance", "attention")


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
        if not pool_levels:
            raise ValueError(f"pool_levels must be a non-empty list of positive ints, got {pool_levels}")
        self.channels = channels
        self.pool_levels = checked_pool_levels(pool_levels, standardize_maps)
        self.standardize_maps = standardize_maps
        self.mlp = embedding_mlp(pooled_feature_count(channels, self.pool_levels), hidden_dim, out_dim)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() != 4 or v.shape[1] != self.channels:
            raise ValueError(f"v must have shape [B, {self.channels}, H, W], got {tuple(v.shape)}")
        check_cells_fit(self.pool_levels, tuple(v.shape[2:]))
        return self.mlp(pooled_mean_variance(standardized_maps(v) if self.standardize_maps else v, self.pool_levels))


def checked_pool_levels(pool_levels: Sequence[int], standardize_maps: bool) -> tuple[int, ...]:
    if any(level < 1 for level in pool_levels):
        raise ValueError(f"pool_levels must be a list of positive ints, got {tuple(pool_levels)}")
    if standardize_maps and pool_levels and max(pool_levels) == 1:
        raise ValueError("standardize_maps leaves nothing for pool level 1 to read: add a level above 1 "
                         f"to pool_levels (or, for the attention readout, leave it empty), got {tuple(pool_levels)}")
    return tuple(pool_levels)


def check_cells_fit(pool_levels: tuple[int, ...], grid: tuple[int, ...]) -> None:
    if pool_levels and max(pool_levels) > min(grid):
        raise ValueError(f"pool level {max(pool_levels)} has more cells than v's grid {grid}")


def pooled_feature_count(channels: int, pool_levels: tuple[int, ...]) -> int:
    return 2 * channels * sum(level * level for level in pool_levels)


def embedding_mlp(feature_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def standardized_maps(v: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each map of ``v [B, C, H, W]`` minus its mean over the grid, over its standard deviation (plus ``eps``)."""
    centred = v - v.mean(dim=(-2, -1), keepdim=True)
    return centred / (centred.square().mean(dim=(-2, -1), keepdim=True) + eps).sqrt()


class AttentionReadout(nn.Module):
    """``g(V): [B, C, H, W] -> [B, out_dim]``: ``queries`` learned queries cross-attend over the pixels (one
    pre-LN ``CrossAttentionBlock``; Perceiver's latent queries, Jaegle et al. 2021), and their states,
    beside ``MeanVarReadout``'s pooled statistics over ``pool_levels`` (none: the queries alone), go through
    ``Linear -> GELU -> Linear``. Not in the spec.

    Each pixel is a token: its ``C`` values projected to ``dim`` plus a row and a column embedding. Pooled
    means and variances keep 0.40 of what the bag-of-words probe asks of ``z`` where a linear map of all
    pixels keeps 0.84 (README, "Token embeddings at unit scale"); a query can read what lies at one place.
    The positions and queries start at unit scale, so that a pixel's key says where it lies (at 0.02 the
    pre-LN branch swamps them, ``modules.networks.text_decoder``). ``standardize_maps`` as in
    ``MeanVarReadout``, for the queries and the statistics alike. Measured beside the pooled readout, P4 read
    no more of the sentence from it (README, "A longer P2, a readout that attends over the pixels").
    """

    def __init__(self, channels: int, grid_size: int, out_dim: int = 256, hidden_dim: int = 512,
                 pool_levels: Sequence[int] = (), standardize_maps: bool = False, queries: int = 8,
                 dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.grid_size = grid_size
        self.pool_levels = checked_pool_levels(pool_levels, standardize_maps)
        check_cells_fit(self.pool_levels, (grid_size, grid_size))
        self.standardize_maps = standardize_maps
        self.pixel = nn.Linear(channels, dim)
        self.rows = nn.Parameter(torch.randn(grid_size, 1, dim))
        self.columns = nn.Parameter(torch.randn(1, grid_size, dim))
        self.queries = nn.Parameter(torch.randn(queries, dim))
        self.attend = CrossAttentionBlock(dim, heads, 4 * dim, dropout=0.0)  # as MeanVarReadout's MLP, no dropout
        self.mlp = embedding_mlp(queries * dim + pooled_feature_count(channels, self.pool_levels), hidden_dim,
                                 out_dim)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() != 4 or v.shape[1:] != (self.channels, self.grid_size, self.grid_size):
            raise ValueError(f"v must have shape [B, {self.channels}, {self.grid_size}, {self.grid_size}], "
                             f"got {tuple(v.shape)}")
        maps = standardized_maps(v) if self.standardize_maps else v
        pixels = rearrange(self.pixel(rearrange(maps, "b c h w -> b h w c")) + self.rows + self.columns,
                           "b h w d -> b (h w) d")
        every_pixel = torch.ones(pixels.shape[:2], dtype=torch.bool, device=v.device)
        states = rearrange(self.attend(self.queries.expand(len(v), -1, -1), pixels, every_pixel), "b q d -> b (q d)")
        features = [states, pooled_mean_variance(maps, self.pool_levels)] if self.pool_levels else [states]
        return self.mlp(torch.cat(features, dim=1))
