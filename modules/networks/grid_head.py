"""Spec 004's grid cross-attention "reshape" head (tokens -> 2-D latent grid ``V``) and the text encoder
``E_phi: x -> V`` that composes it with the token Transformer ("Suggested Model Structure").

``V`` is channels-first, ``[B, C, H, W]``, where the spec writes ``H × W × C``: convolutions, FFTs
and pooling then apply to it directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from modules.networks.text_encoder import FeedForward, MultiHeadAttention, TextTransformer, check_token_batch


def coordinate_grid(size: int) -> torch.Tensor:
    """``[2, size, size]``: channel 0 is x (varies along the width), channel 1 is y (along the height),
    both from -1 to 1 (spec 004 "Positional signal")."""
    axis = torch.linspace(-1.0, 1.0, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x, y])


class CrossAttentionBlock(nn.Module):
    """Grid queries attend to the token states: ``q + Attn(LN(q), LN(tokens))``, then ``q + FFN(LN(q))``."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.token_norm = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(dim, heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(self.query_norm(queries), self.token_norm(tokens), mask)
        queries = queries + self.residual_dropout(attended)
        return queries + self.residual_dropout(self.ffn(self.ffn_norm(queries)))


class LocalSmoothing(nn.Module):
    """Spec 004's optional local smoothing head, ``v + Conv1x1(GELU(DepthwiseConv3x3(v)))``.

    The 1x1 conv starts at zero, so the head starts as the identity and learns how much to smooth.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels)
        self.mix = nn.Conv2d(channels, channels, kernel_size=1)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v + self.mix(F.gelu(self.depthwise(v)))


class GridCrossAttentionHead(nn.Module):
    """Token states ``[B, L, dim]`` -> latent grid ``V: [B, channels, grid, grid]`` (spec 004 grid head).

    A learned ``[query_channels, grid, grid]`` map (plus two fixed x, y channels with
    ``coordinate_channels``) goes through ``Conv3x3(-> dim) -> GELU -> Conv1x1(dim -> dim)``, giving
    one query per cell. ``depth`` cross-attention blocks let the queries read the tokens; a LayerNorm
    and ``Linear(dim -> channels)`` give ``V``.
    """

    def __init__(self, dim: int = 384, grid_size: int = 32, query_channels: int = 64, channels: int = 6,
                 heads: int = 8, ffn_dim: int = 768, depth: int = 2, dropout: float = 0.1,
                 smoothing: bool = False, coordinate_channels: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.grid_size = grid_size
        # Unit scale: the map starts as a random image, so every cell's query differs from the start.
        self.query_map = nn.Parameter(torch.randn(query_channels, grid_size, grid_size))
        self.register_buffer("coordinates", coordinate_grid(grid_size) if coordinate_channels else None,
                             persistent=False)
        map_channels = query_channels + (2 if coordinate_channels else 0)
        self.query_convs = nn.Sequential(nn.Conv2d(map_channels, dim, kernel_size=3, padding=1), nn.GELU(),
                                         nn.Conv2d(dim, dim, kernel_size=1))
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads, ffn_dim, dropout) for _ in range(depth))
        self.output_norm = nn.LayerNorm(dim)
        self.to_channels = nn.Linear(dim, channels)
        self.smoothing = LocalSmoothing(channels) if smoothing else None

    def grid_queries(self) -> torch.Tensor:
        """The ``[grid * grid, dim]`` queries, row-major over the grid; the same for every sentence."""
        query_map = self.query_map
        if self.coordinates is not None:
            query_map = torch.cat([query_map, self.coordinates])
        return rearrange(self.query_convs(query_map.unsqueeze(0)), "1 d h w -> (h w) d")

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``V: [B, channels, grid, grid]`` from ``tokens: [B, L, dim]`` and ``mask: Bool[B, L]``
        (True = real token)."""
        if tokens.dim() != 3 or tokens.shape[2] != self.dim:
            raise ValueError(f"tokens must have shape [B, L, {self.dim}], got {tuple(tokens.shape)}")
        check_token_batch(tokens, mask, "tokens")
        queries = self.grid_queries().expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, tokens, mask)
        v = rearrange(self.to_channels(self.output_norm(queries)), "b (h w) c -> b c h w", h=self.grid_size)
        return v if self.smoothing is None else self.smoothing(v)


class TextToGrid(nn.Module):
    """Spec 004's text encoder ``E_phi: x -> V``: ``TextTransformer`` then ``GridCrossAttentionHead``.

    When the head is narrower than the encoder (a cheaper head for small machines), a linear map
    brings the token states to the head's width; at the spec's sizes both are 384 and none is added.
    """

    def __init__(self, encoder: TextTransformer, head: GridCrossAttentionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.token_projection = nn.Identity() if encoder.dim == head.dim else nn.Linear(encoder.dim, head.dim)
        self.head = head

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``V: [B, C, H, W]`` for ``ids: Long[B, L]`` and ``mask: Bool[B, L]`` (True = real token)."""
        return self.paint(self.encoder(ids, mask), mask)

    def paint(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``V`` from the Transformer's token states ``[B, L, dim]``, for callers that also read the states."""
        return self.head(self.token_projection(states), mask)
