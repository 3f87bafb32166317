"""The token encoder of spec 004's text encoder ("Suggested Model Structure", Transformer Encoder).

A small pre-LayerNorm Transformer that turns token ids into token states ``H ∈ R^{L×dim}``; the grid
head (``grid_head.py``) then paints the latent grid ``V`` from these states. The attention and
feed-forward layers here are shared with that head.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

ROTARY_BASE = 10_000.0  # RoFormer's frequency base
EMBEDDING_INIT_STD = 0.02  # BERT/GPT's scale, for learned positions and the decoder's tables
# Token embeddings start at unit scale, the scale that the Transformer's sqrt(d_model) factor (Vaswani et al. 2017,
# 3.4) gives a table drawn from N(0, 1/d_model), as common implementations draw it. At 0.02 the pre-LN blocks'
# outputs, whose scale LayerNorm fixes, swamp the residual stream, and what all tokens share in them dominates: for
# the CPU profile's encoder the states of random tokens start at a mean cosine of 0.61 to 0.70 (learned positions;
# 0.33 to 0.44 rotary), against about 0.02 at unit scale (tests/test_text_networks.py). Learned positions and the
# decoder's tables keep 0.02.
TOKEN_EMBEDDING_STD = 1.0
EMPTY_ROW_MESSAGE = "mask has a row with no real token (all False)"


def rotary_tables(length: int, head_dim: int, base: float = ROTARY_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the rotary angles ``m * base^(-2i/d)``, each ``[length, head_dim / 2]``.

    Rotary position embedding (RoFormer, Su et al. 2021, eq. 34): pair ``i`` of a head's features
    at position ``m`` is rotated by the angle ``m * theta_i``.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), frequencies)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: [..., L, head_dim]`` by position; feature ``i`` is paired with ``i + head_dim / 2``.

    The rotation makes ``<R_m q, R_n k>`` a function of ``q``, ``k`` and ``n - m`` only, which is
    what gives attention its relative-position dependence.
    """
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast q and k are half precision
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class MultiHeadAttention(nn.Module):
    """Multi-head attention of ``queries [B, Lq, dim]`` over ``keys_values [B, Lk, dim]``.

    Self-attention passes the same states twice; cross-attention passes the query grid and the
    token states. Keys where ``key_mask [B, Lk]`` is False (padding) receive no attention.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.output = nn.Linear(dim, dim)

    def _heads(self, queries: torch.Tensor, keys_values: torch.Tensor,
               rotary: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        q = rearrange(self.query(queries), "b l (h d) -> b h l d", h=self.heads)
        k, v = rearrange(self.key_value(keys_values), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k, v

    @staticmethod
    def _mask(key_mask: torch.Tensor, num_queries: int, causal: bool) -> torch.Tensor:
        mask = rearrange(key_mask, "b l -> b 1 1 l")
        if causal:  # query i sees keys 0..i (self-attention of a decoder)
            mask = mask & torch.ones(num_queries, key_mask.shape[1], dtype=torch.bool,
                                     device=key_mask.device).tril()
        return mask

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor, key_mask: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, causal: bool = False) -> torch.Tensor:
        q, k, v = self._heads(queries, keys_values, rotary)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(key_mask, q.shape[2], causal),
                                                  dropout_p=self.dropout if self.training else 0.0)
        return self.output(rearrange(attended, "b h l d -> b l (h d)"))

    def weights(self, queries: torch.Tensor, keys_values: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """The attention weights ``[B, heads, Lq, Lk]`` of ``forward`` (no dropout, no rotary), for
        diagnostics."""
        q, k, _ = self._heads(queries, keys_values, None)
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        return scores.masked_fill(~self._mask(key_mask, q.shape[2], False), float("-inf")).softmax(dim=-1)


class FeedForward(nn.Sequential):
    """``Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, dim)``, the Transformer FFN."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden_dim, dim))


class EncoderBlock(nn.Module):
    """Pre-LayerNorm block: ``x + Attn(LN(x))``, then ``x + FFN(LN(x))``, dropout on each branch."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(dim, heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        normed = self.attention_norm(x)
        x = x + self.residual_dropout(self.attention(normed, normed, mask, rotary))
        return x + self.residual_dropout(self.ffn(self.ffn_norm(x)))


def check_token_batch(ids_or_states: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    """ValueError unless ``mask`` is a boolean ``[B, L]`` matching ``name`` and every row has a real token.

    A row with no real token would attend to nothing and turn into NaNs. Reading that on the host
    would stall an accelerator every forward, so there the check is a device-side assertion.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = real token), got dtype {mask.dtype}")
    if mask.shape != ids_or_states.shape[:2]:
        raise ValueError(f"mask must have shape [B, L] = {tuple(ids_or_states.shape[:2])} to match {name}, "
                         f"got {tuple(mask.shape)}")
    every_row_has_a_token = mask.any(dim=1).all()
    if mask.device.type != "cpu":
        torch._assert_async(every_row_has_a_token, EMPTY_ROW_MESSAGE)
    elif not every_row_has_a_token:
        raise ValueError(EMPTY_ROW_MESSAGE)


class TextTransformer(nn.Module):
    """Spec 004 "Transformer Encoder (small)": token ids ``[B, L]`` -> token states ``[B, L, dim]``.

    Defaults are the spec's: 6 pre-LN layers of width 384, 8 heads, FFN 1536 with GELU, dropout 0.1,
    rotary or learned absolute positions, and a final LayerNorm; token embeddings start from
    ``N(0, token_embedding_std^2)`` (``TOKEN_EMBEDDING_STD``; 0.02 is BERT's and GPT's), learned positions from
    ``N(0, position_embedding_std^2)`` truncated at +-2 (absolute bounds: nothing is cut at the default 0.02).
    """

    def __init__(self, vocab_size: int, max_length: int = 64, dim: int = 384, depth: int = 6, heads: int = 8,
                 ffn_dim: int = 1536, dropout: float = 0.1, positions: Literal["rope", "learned"] = "rope",
                 pad_id: int = 0, token_embedding_std: float = TOKEN_EMBEDDING_STD,
                 position_embedding_std: float = EMBEDDING_INIT_STD) -> None:
        super().__init__()
        if positions not in ("rope", "learned"):
            raise ValueError(f"positions must be 'rope' or 'learned', got {positions!r}")
        self.max_length = max_length
        self.dim = dim
        self.token_embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        nn.init.normal_(self.token_embedding.weight, std=token_embedding_std)
        with torch.no_grad():
            self.token_embedding.weight[pad_id].zero_()
        self.position_embedding = None
        if positions == "learned":
            self.position_embedding = nn.Parameter(torch.empty(max_length, dim))
            nn.init.trunc_normal_(self.position_embedding, std=position_embedding_std)
        else:
            cos, sin = rotary_tables(max_length, dim // heads)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, ffn_dim, dropout) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states ``[B, L, dim]`` for ``ids: Long[B, L]`` and ``mask: Bool[B, L]`` (True = real token).

        Outputs at padded positions are meaningless; real positions never attend to them.
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape [B, L], got {tuple(ids.shape)}")
        length = ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"ids has length {length}, more than max_length={self.max_length}")
        check_token_batch(ids, mask, "ids")
        x = self.token_embedding(ids)
        rotary = None
        if self.position_embedding is None:
            rotary = (self.rotary_cos[:length], self.rotary_sin[:length])
        else:
            x = x + self.position_embedding[:length]
        x = self.embedding_dropout(x)
        for block in self.blocks:
            x = block(x, mask, rotary)
        return self.final_norm(x)


def mean_token_state(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of token states ``[B, L, dim]`` over each row's real tokens (``mask [B, L]``): ``[B, dim]``."""
    return (states * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)


class MeanTokenEmbedding(nn.Module):
    """``z`` = a linear map of the mean of the Transformer's token states over the real tokens: the sentence
    without the latent grid. The Transformer is ``encoder``, as it is inside
    ``modules.networks.grid_head.TextToGrid``, so that its weights keep their names."""

    def __init__(self, tokens: TextTransformer, embedding_dim: int) -> None:
        super().__init__()
        self.encoder = tokens
        self.to_embedding = nn.Linear(tokens.dim, embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.encoder.token_embedding.padding_idx
        return self.to_embedding(mean_token_state(self.encoder(ids, mask), mask))
