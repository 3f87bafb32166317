"""Spec 004 P4's reconstruction objective and its diagnostics, as pure functions: ``L_dec = CE(x, D(V(x)))``
under teacher forcing and a constrained vocabulary, the spatial shuffle ablation, and how concentrated a
token's attention over the grid is. Token accuracy and cross-entropy by token kind are
``modules.latent_decoding``'s, summed per sentence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from text.tokenizer import BOS_ID, PAD_ID


def teacher_forcing(framed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of ids framed as ``BOS w_1 .. w_n EOS PAD ..`` ``[B, L]``: the inputs drop the
    last column, the targets the first (``targets[:, t]`` is the token after ``inputs[:, t]``)."""
    if framed.dim() != 2 or framed.shape[1] < 2:
        raise ValueError(f"framed ids must be [B, L >= 2], got shape {tuple(framed.shape)}")
    every_row_starts_with_bos = (framed[:, 0] == BOS_ID).all()
    message = f"framed ids must start every row with BOS ({BOS_ID})"
    if framed.device.type != "cpu":  # reading it on the host would stall an accelerator every step
        torch._assert_async(every_row_starts_with_bos, message)
    elif not every_row_starts_with_bos:
        raise ValueError(f"{message}, got first column {framed[:, 0].tolist()}")
    return framed[:, :-1], framed[:, 1:]


def vocabulary_mask(corpus_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The tokens a decoder may produce ``[vocab_size]`` (bool): every id among the framed corpus targets
    (its words and EOS), never PAD or BOS. The corpus grammar (colors, shapes, counts, relations, glue
    words) is what the training sentences contain."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[corpus_ids.flatten()] = True
    allowed[[PAD_ID, BOS_ID]] = False
    return allowed


def masked_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``logits`` with every token outside ``allowed`` at ``-inf``: no sampling or argmax can produce it."""
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def reconstruction_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-padding targets (``logits [B, L, V]``, ``targets [B, L]``)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD_ID)


def shuffle_pixels(v: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``v [B, C, H, W]`` with the pixels of every map permuted at random, each map its own permutation:
    every map keeps its values (so its mean and variance) and loses its layout (spec P4 "Ablation")."""
    b, c, h, w = v.shape
    order = torch.rand(b, c, h * w, device=v.device, generator=generator).argsort(dim=-1)
    return v.flatten(2).gather(2, order).view(b, c, h, w)


def attention_concentration(weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """For attention weights over ``N`` grid positions ``[..., N]``, per row ``[...]``: the entropy in units of
    the uniform's, ``H(w) / log N`` (1: spread evenly, 0: one position), and the peak weight over the
    uniform's, ``N max w`` (1: spread evenly, N: one position). Rows are renormalized first."""
    weights = weights / weights.sum(dim=-1, keepdim=True)
    size = weights.shape[-1]
    entropy = -(weights * weights.clamp(min=1e-12).log()).sum(dim=-1) / math.log(size)
    return {"entropy": entropy, "peak": size * weights.max(dim=-1).values}
