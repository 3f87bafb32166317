"""Spec 004 P4's decoder ``D_psi`` ("Bring in the Text Decoder"): a causal Transformer language model over
token ids that cross-attends to the flattened latent grid ``V`` (each pixel, or each square patch of pixels, a
memory token with a learned 2-D position: ``LatentMemory``) and to the pooled readout ``z`` (one more memory
token).

Its token embeddings and the memory's row and column embeddings start at BERT's 0.02 by default. There the
pre-LN blocks' branches (default ``Linear`` init, inputs at LayerNorm's scale) swamp them, so every decoder
state starts alike and a pixel's key carries little of where the pixel lies (the effect
``modules.networks.text_encoder.TOKEN_EMBEDDING_STD`` removes from the encoder). Started at unit scale
(``token_embedding_std``, ``memory_position_std``), the content tokens' attention localizes sooner, but the
CPU profile's P4 read less of the sentence in the same steps (README, "The decoder's start"), so 0.02 stays
the default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from modules.networks.grid_head import CrossAttentionBlock
from modules.networks.readout import standardized_maps
from modules.networks.text_encoder import EMBEDDING_INIT_STD, MultiHeadAttention, check_token_batch


def hide_tokens(inputs: torch.Tensor, hidden: torch.Tensor | None, bos_id: int) -> torch.Tensor:
    """``inputs`` with every token of ``hidden [vocab]`` (bool) replaced by ``bos_id``, which stands nowhere
    else after the first position: the decoder sees that a hidden token stood there, not which one."""
    return inputs if hidden is None else torch.where(hidden.to(inputs.device)[inputs], bos_id, inputs)


class LatentMemory(nn.Module):
    """``V [B, C, H, W]`` and ``z [B, E]`` -> memory ``[B, 1 + (H / p) (W / p), dim]``: ``z`` projected as the
    first token, then every ``p x p`` patch's ``p p C`` values projected (``Linear``, or with ``pixel_mlp`` the
    spec's "small MLP on V") plus a row and a column embedding (from ``N(0, position_std^2)``). ``p`` is
    ``patch_size``: 1 (the default) reads each pixel as its own token, larger patches read a ViT's patch
    embedding (Dosovitskiy et al. 2021), so that one memory token can hold a pattern spread over its patch
    (not in the spec). The order is row-major, so memory token ``1 + i (W / p) + j`` is patch ``(i, j)``. With
    ``standardize_maps`` the pixels are read from each map standardized
    (``modules.networks.readout.standardized_maps``), as a readout that sees only the layout reads them."""

    def __init__(self, channels: int, grid_size: int, embedding_dim: int, dim: int, pixel_mlp: bool = False,
                 standardize_maps: bool = False, position_std: float = EMBEDDING_INIT_STD,
                 patch_size: int = 1) -> None:
        super().__init__()
        if patch_size < 1 or grid_size % patch_size:
            raise ValueError(f"patch_size must be a positive divisor of grid_size {grid_size}, got {patch_size}")
        self.grid_size = grid_size
        self.patch_size = patch_size
        self.standardize_maps = standardize_maps
        values = channels * patch_size**2
        # "pixel" names the projection for any patch size, so per-pixel checkpoints keep loading
        self.pixel = (nn.Sequential(nn.Linear(values, dim), nn.GELU(), nn.Linear(dim, dim)) if pixel_mlp
                      else nn.Linear(values, dim))
        patches = grid_size // patch_size
        self.rows = nn.Parameter(torch.empty(patches, 1, dim))
        self.columns = nn.Parameter(torch.empty(1, patches, dim))
        for table in (self.rows, self.columns):
            nn.init.trunc_normal_(table, std=position_std)
        self.summary = nn.Linear(embedding_dim, dim)

    def forward(self, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if v.dim() != 4 or v.shape[2:] != (self.grid_size, self.grid_size):
            raise ValueError(f"v must have shape [B, C, {self.grid_size}, {self.grid_size}], got {tuple(v.shape)}")
        if self.standardize_maps:
            v = standardized_maps(v)
        patches = rearrange(v, "b c (h p1) (w p2) -> b h w (p1 p2 c)", p1=self.patch_size, p2=self.patch_size)
        tokens = self.pixel(patches) + self.rows + self.columns
        return torch.cat([self.summary(z).unsqueeze(1), rearrange(tokens, "b h w d -> b (h w) d")], dim=1)

    def over_pixels(self, weights: torch.Tensor) -> torch.Tensor:
        """Weights over the patches ``[..., (H / p) (W / p)]`` as weights over the pixels ``[..., H W]`` (row-major),
        each patch's weight shared evenly by its ``p^2`` pixels: a map over patches is read at pixel resolution,
        so its entropy is in the same units as a pixel memory's and is never lower for being coarser."""
        if self.patch_size == 1:
            return weights
        patches = self.grid_size // self.patch_size
        grid = rearrange(weights, "... (h w) -> ... h w", h=patches) / self.patch_size**2
        grid = grid.repeat_interleave(self.patch_size, dim=-2).repeat_interleave(self.patch_size, dim=-1)
        return rearrange(grid, "... h w -> ... (h w)")


class DecoderBlock(nn.Module):
    """Pre-LN: ``x + SelfAttn_causal(LN(x))``, then the grid head's cross-attention block over the memory
    (``x + CrossAttn(LN(x), LN(memory))``, ``x + FFN(LN(x))``)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attention = MultiHeadAttention(dim, heads, dropout)
        self.residual_dropout = nn.Dropout(dropout)
        self.cross = CrossAttentionBlock(dim, heads, ffn_dim, dropout)

    def attend_to_prefix(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        normed = self.self_norm(x)
        return x + self.residual_dropout(self.self_attention(normed, normed, mask, causal=True))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.cross(self.attend_to_prefix(x, mask), memory, memory_mask(memory))

    def cross_attention_weights(self, x: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        queries = self.cross.query_norm(self.attend_to_prefix(x, mask))
        return self.cross.attention.weights(queries, self.cross.token_norm(memory), memory_mask(memory))

    def memory_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention's keys and values of ``memory`` ``[B, heads, M, d]``, computed once per decoding."""
        attention = self.cross.attention
        return tuple(rearrange(attention.key_value(self.cross.token_norm(memory)), "b m (two h d) -> two b h m d",
                               two=2, h=attention.heads))

    def step(self, x: torch.Tensor, cache: list[torch.Tensor], memory_kv: tuple[torch.Tensor, torch.Tensor]
             ) -> torch.Tensor:
        """``forward`` for the newest position only, ``x [B, 1, dim]``, in eval mode: ``cache`` holds the keys and
        values of the positions before it (extended in place), ``memory_kv`` the memory's
        (``memory_keys_values``). No position of a live row's decoded prefix is PAD (``generate`` never writes it),
        so no mask is needed; an ended row's later positions are overwritten with PAD anyway."""
        attention = self.self_attention
        normed = self.self_norm(x)
        q, k, v = attention._heads(normed, normed, None)
        if cache:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        cache[:] = [k, v]
        x = x + attention.output(rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)"))
        cross = self.cross
        q = rearrange(cross.attention.query(cross.query_norm(x)), "b l (h d) -> b h l d", h=cross.attention.heads)
        attended = F.scaled_dot_product_attention(q, *memory_kv)
        x = x + cross.attention.output(rearrange(attended, "b h l d -> b l (h d)"))
        return x + cross.ffn(cross.ffn_norm(x))


def memory_mask(memory: torch.Tensor) -> torch.Tensor:
    """Every memory token is real."""
    return torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)


class LatentTextDecoder(nn.Module):
    """``D_psi(ids, V, z)``: logits ``[B, L, vocab]`` of each next token given the ids so far (teacher
    forcing: ``ids`` starts with BOS) and the memory of ``LatentMemory``; learned absolute positions (from
    ``N(0, 0.02^2)``, as the encoder's), token embeddings from ``N(0, token_embedding_std^2)``."""

    def __init__(self, vocab_size: int, max_length: int, channels: int, grid_size: int, embedding_dim: int,
                 dim: int = 384, depth: int = 4, heads: int = 8, ffn_dim: int = 1536, dropout: float = 0.1,
                 pixel_mlp: bool = False, pad_id: int = 0, standardize_maps: bool = False,
                 token_embedding_std: float = EMBEDDING_INIT_STD,
                 memory_position_std: float = EMBEDDING_INIT_STD, patch_size: int = 1) -> None:
        super().__init__()
        self.max_length = max_length
        self.pad_id = pad_id
        self.memory = LatentMemory(channels, grid_size, embedding_dim, dim, pixel_mlp, standardize_maps,
                                   memory_position_std, patch_size)
        self.token_embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        nn.init.normal_(self.token_embedding.weight, std=token_embedding_std)
        with torch.no_grad():
            self.token_embedding.weight[pad_id].zero_()
        self.position_embedding = nn.Parameter(torch.empty(max_length, dim))
        nn.init.trunc_normal_(self.position_embedding, std=EMBEDDING_INIT_STD)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, ffn_dim, dropout) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, vocab_size)

    def _states(self, ids: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
        if ids.dim() != 2 or ids.shape[1] > self.max_length:
            raise ValueError(f"ids must have shape [B, L] with L <= {self.max_length}, got {tuple(ids.shape)}")
        mask = ids != self.pad_id
        check_token_batch(ids, mask, "ids")
        x = self.embedding_dropout(self.token_embedding(ids) + self.position_embedding[: ids.shape[1]])
        return x, mask, self.memory(v, z)

    def forward(self, ids: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x, mask, memory = self._states(ids, v, z)
        for block in self.blocks:
            x = block(x, mask, memory)
        return self.to_logits(self.final_norm(x))

    @torch.no_grad()
    def cross_attention(self, ids: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The last block's cross-attention weights ``[B, heads, L, 1 + (H / p) (W / p)]`` over the memory (token 0
        is ``z``, then the patches of side ``p``: ``LatentMemory``)."""
        x, mask, memory = self._states(ids, v, z)
        for block in self.blocks[:-1]:
            x = block(x, mask, memory)
        return self.blocks[-1].cross_attention_weights(x, mask, memory)

    @torch.no_grad()
    def generate(self, v: torch.Tensor, z: torch.Tensor, bos_id: int, eos_id: int,
                 allowed: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 length: int | None = None, copies: int = 1) -> torch.Tensor:
        """Decoding from the latent alone: ids ``[B * copies, length]`` (``max_length`` by default; rows
        ``b * copies`` to ``(b + 1) * copies - 1`` from latent ``b``) starting with ``bos_id``, each row padded
        after its first ``eos_id``. Greedy, or with ``top_p`` nucleus sampling (Holtzman et al. 2020) from
        ``generator``; ``allowed`` restricts the tokens written, before the nucleus is taken, ``hidden`` ones are
        fed back as ``bos_id`` (``hide_tokens``). The decoder runs in eval mode (no dropout) with its keys and
        values cached, so each step reads only the newest token, and the memory's keys and values are computed
        once per latent, whatever the copies. PAD and BOS are never written. Every row runs to ``length`` ids:
        stopping once all rows have ended would read the device from the host at every step."""
        length = self.max_length if length is None else min(length, self.max_length)
        was_training = self.training
        self.eval()
        try:
            return self._decode(v, z, bos_id, eos_id, allowed, hidden, top_p, generator, length, copies)
        finally:
            self.train(was_training)

    def _decode(self, v, z, bos_id, eos_id, allowed, hidden, top_p, generator, length, copies) -> torch.Tensor:
        memory = self.memory(v, z)
        memory_kv = [tuple(values.repeat_interleave(copies, dim=0) for values in block.memory_keys_values(memory))
                     for block in self.blocks]
        caches: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        rows = len(v) * copies
        ids = torch.full((rows, 1), bos_id, dtype=torch.long, device=v.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=v.device)
        for position in range(length - 1):
            x = self.token_embedding(hide_tokens(ids[:, -1:], hidden, bos_id)) + self.position_embedding[position]
            for block, cache, kv in zip(self.blocks, caches, memory_kv):
                x = block.step(x, cache, kv)
            logits = self.to_logits(self.final_norm(x))[:, -1]
            logits[:, [self.pad_id, bos_id]] = float("-inf")  # never written: every decoded position stays real
            if allowed is not None:
                logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
            chosen = logits.argmax(dim=-1) if top_p is None else sample_nucleus(logits, top_p, generator)
            step = torch.where(finished, self.pad_id, chosen)
            ids = torch.cat([ids, step.unsqueeze(1)], dim=1)
            finished = finished | (step == eos_id)
        return ids


def nucleus_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits [..., vocab]`` with every token outside the nucleus at ``-inf``: the smallest set of most likely
    tokens whose probabilities sum to at least ``top_p`` (the most likely token always stays)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_p == 1.0:  # the whole distribution; a rounded cumulative sum could cut its tail
        return logits
    ordered, order = logits.sort(dim=-1, descending=True, stable=True)  # ties at the edge: the lower id stays
    probabilities = ordered.softmax(dim=-1)
    outside_in_order = probabilities.cumsum(dim=-1) - probabilities >= top_p  # the mass before it is enough
    outside = torch.zeros_like(outside_in_order).scatter(-1, order, outside_in_order)
    return logits.masked_fill(outside, float("-inf"))


def sample_nucleus(logits: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits [B, vocab]`` drawn from its nucleus (``nucleus_logits``)."""
    probabilities = nucleus_logits(logits, top_p).softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
