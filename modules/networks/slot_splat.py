"""Spec 004's slot-attention variant of the latent head ("Notes & Alternatives"): slot attention over the
token states gives ``K`` slots, and each slot is splatted onto the grid as a 2-D Gaussian with its own mean,
covariance and channel mixing, so that ``V`` is made of blobs, one per thing the sentence names.
"""

from __future__ import annotations

import math

import torch
from einops import einsum
from torch import nn

from modules.networks.grid_head import coordinate_grid
from modules.networks.text_encoder import FeedForward, check_token_batch

ATTENTION_EPS = 1e-8  # Locatello et al.: keeps a slot that wins no token from dividing by zero


class SlotAttention(nn.Module):
    """Slot attention (Locatello et al. 2020, Algorithm 1) over token states ``[B, L, dim]`` with a mask.

    Slots compete for tokens (the softmax runs over slots), then each slot takes the weighted mean of the
    values of the tokens it won, through a GRU and a residual MLP, ``iterations`` times. The initial slots
    are learned vectors rather than Gaussian samples (as in Jia et al. 2023, BO-QSA), so a sentence always
    gets the same latent and each slot can specialize.
    """

    def __init__(self, dim: int, num_slots: int = 6, iterations: int = 3, hidden_dim: int | None = None) -> None:
        super().__init__()
        if num_slots < 1 or iterations < 1:
            raise ValueError(f"num_slots and iterations must be positive, got {num_slots} and {iterations}")
        self.iterations = iterations
        self.initial_slots = nn.Parameter(torch.randn(num_slots, dim) * dim**-0.5)
        self.input_norm = nn.LayerNorm(dim)
        self.slot_norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, hidden_dim or 2 * dim, 0.0)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Slots ``[B, K, dim]`` for ``tokens [B, L, dim]`` and ``mask: Bool[B, L]`` (True = real token)."""
        inputs = self.input_norm(tokens)
        keys, values = self.key(inputs), self.value(inputs)
        slots = self.initial_slots.expand(len(tokens), -1, -1)
        scale = tokens.shape[-1] ** -0.5
        for _ in range(self.iterations):
            queries = self.query(self.slot_norm(slots))
            competition = (einsum(queries, keys, "b k d, b l d -> b k l") * scale).softmax(dim=1)
            won = (competition + ATTENTION_EPS) * mask.unsqueeze(1)  # padding gives no slot anything
            updates = einsum(won / won.sum(dim=-1, keepdim=True), values, "b k l, b l d -> b k d")
            slots = self.gru(updates.flatten(0, 1), slots.flatten(0, 1)).view_as(slots)
            slots = slots + self.mlp(self.mlp_norm(slots))
        return slots


def gaussian_splat(means: torch.Tensor, scales: torch.Tensor, angles: torch.Tensor, weights: torch.Tensor,
                   coordinates: torch.Tensor) -> torch.Tensor:
    """``V [B, C, H, W] = sum_k weights[b, k, c] exp(-d^T Sigma_k^-1 d / 2)``, ``d`` = position minus ``means``.

    ``means [B, K, 2]`` (x, y) and ``scales [B, K, 2]`` (standard deviations along the Gaussian's own axes)
    are in the units of ``coordinates [2, H, W]`` (x then y), ``angles [B, K]`` rotate those axes
    (radians, counter-clockwise), ``weights [B, K, C]`` mix each slot into the channels.
    """
    offsets = coordinates.flatten(1).T - means.unsqueeze(2)  # [B, K, HW, 2]
    cos, sin = angles.cos().unsqueeze(-1), angles.sin().unsqueeze(-1)
    along = (cos * offsets[..., 0] + sin * offsets[..., 1]) / scales[..., :1]
    across = (cos * offsets[..., 1] - sin * offsets[..., 0]) / scales[..., 1:]
    density = torch.exp(-0.5 * (along.square() + across.square()))  # [B, K, HW]
    v = einsum(density, weights, "b k n, b k c -> b c n")
    return v.view(*v.shape[:2], *coordinates.shape[1:])


class GaussianPainter(nn.Module):
    """Vectors ``[B, K, dim]`` -> ``V [B, channels, grid, grid]``: per vector a linear map to its Gaussian's mean
    (``tanh``, inside the grid), two scales (``min_scale`` to ``max_scale`` pixels, by a sigmoid), an angle and
    ``channels`` mixing weights, painted by ``gaussian_splat``; a vector whose ``present`` is False paints
    nothing."""

    def __init__(self, dim: int, grid_size: int, channels: int, min_scale: float = 1.0,
                 max_scale: float = 8.0) -> None:
        super().__init__()
        if not 0 < min_scale < max_scale:
            raise ValueError(f"need 0 < min_scale < max_scale (pixels), got {min_scale} and {max_scale}")
        self.norm = nn.LayerNorm(dim)
        self.to_geometry = nn.Linear(dim, 5)
        self.to_channels = nn.Linear(dim, channels)
        pixel = 2.0 / (grid_size - 1)  # coordinate_grid spans [-1, 1]
        self.min_scale, self.max_scale = min_scale * pixel, max_scale * pixel
        self.register_buffer("coordinates", coordinate_grid(grid_size), persistent=False)

    def forward(self, vectors: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        vectors = self.norm(vectors)
        geometry = self.to_geometry(vectors)
        scales = self.min_scale + (self.max_scale - self.min_scale) * torch.sigmoid(geometry[..., 2:4])
        weights = self.to_channels(vectors)
        if present is not None:
            weights = weights * present.unsqueeze(-1).to(weights.dtype)
        return gaussian_splat(torch.tanh(geometry[..., :2]), scales, math.pi * torch.tanh(geometry[..., 4]),
                              weights, self.coordinates.to(vectors.dtype))


class SlotSplatHead(nn.Module):
    """Token states ``[B, L, dim]`` -> ``V [B, channels, grid, grid]``: ``SlotAttention``, then each slot painted
    as a Gaussian (``GaussianPainter``). Drop-in for ``GridCrossAttentionHead`` in ``TextToGrid``."""

    def __init__(self, dim: int, grid_size: int, channels: int, num_slots: int = 6, iterations: int = 3,
                 hidden_dim: int | None = None, min_scale: float = 1.0, max_scale: float = 8.0) -> None:
        super().__init__()
        self.dim = dim
        self.grid_size = grid_size
        self.slots = SlotAttention(dim, num_slots, iterations, hidden_dim)
        self.painter = GaussianPainter(dim, grid_size, channels, min_scale, max_scale)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3 or tokens.shape[2] != self.dim:
            raise ValueError(f"tokens must have shape [B, L, {self.dim}], got {tuple(tokens.shape)}")
        check_token_batch(tokens, mask, "tokens")
        return self.painter(self.slots(tokens, mask))


def rename_pre_painter_weights(state: dict, prefix: str) -> None:
    """Renames, in place, the weights a ``SlotSplatHead`` at ``prefix`` of ``state`` saved before
    ``GaussianPainter`` held them."""
    for old, new in (("slot_norm", "norm"), ("to_geometry", "to_geometry"), ("to_channels", "to_channels")):
        for param in ("weight", "bias"):
            if f"{prefix}{old}.{param}" in state:
                state[f"{prefix}painter.{new}.{param}"] = state.pop(f"{prefix}{old}.{param}")


class TokenSplatHead(nn.Module):
    """Token states ``[B, L, dim]`` -> ``V [B, channels, grid, grid]``: every real token painted as its own
    Gaussian (``GaussianPainter``), padding painting nothing.

    Not in the spec: its slot variant with one "slot" per token and no competition between slots. Each
    contextual token state chooses where its blob lies and what it mixes into the channels, so every word of
    the sentence reaches the grid at a place of its own, where a grid query or a slot must first learn to look
    for it. Drop-in for ``GridCrossAttentionHead`` in ``TextToGrid``.
    """

    def __init__(self, dim: int, grid_size: int, channels: int, min_scale: float = 1.0,
                 max_scale: float = 8.0) -> None:
        super().__init__()
        self.dim = dim
        self.grid_size = grid_size
        self.painter = GaussianPainter(dim, grid_size, channels, min_scale, max_scale)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3 or tokens.shape[2] != self.dim:
            raise ValueError(f"tokens must have shape [B, L, {self.dim}], got {tuple(tokens.shape)}")
        check_token_batch(tokens, mask, "tokens")
        return self.painter(tokens, mask)


class SummedHeads(nn.Module):
    """``V = sum_i head_i(tokens, mask)`` for heads of one width (e.g. the grid head's texture plus the slots'
    blobs: smooth Gaussians alone cannot meet the spectrum prior's ``1/f^2`` and hide at the grid's edge,
    where the FFT's wrap-around lends them one)."""

    def __init__(self, *heads: nn.Module) -> None:
        super().__init__()
        if len({head.dim for head in heads}) != 1:
            raise ValueError(f"summed heads need one width, got {[head.dim for head in heads]}")
        self.dim = heads[0].dim
        self.heads = nn.ModuleList(heads)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return sum(head(tokens, mask) for head in self.heads)
