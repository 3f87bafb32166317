"""The bag-of-words reconstruction term on a sentence's embedding (Zhao, Zhao and Eskenazi 2017, "Learning
Discourse-level Diversity for Neural Dialog Models using Conditional Variational Autoencoders", Sec. 3.2): one
softmax ``f(z)`` over the vocabulary must give every word of the sentence, order ignored,
``L_bow = -1/|x| sum_{w in x} log softmax(f(z))_w``. InfoNCE is met by whatever tells a batch's scenes
apart; this term asks the embedding for every word. With ``max_n > 1`` the bag holds the sentence's n-grams
(hashed into a fixed number of buckets) as well, which bind a color to its shape and a relation to its
arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NGRAM_HASH_BASE = 1_000_003  # a prime above any vocabulary size, so that n-grams of different words differ
MAX_N = 3  # n-gram codes stay within int64: base^3 is about 1e18


def ngram_bag(ids: torch.Tensor, pad_id: int, max_n: int, buckets: int) -> torch.Tensor:
    """Counts ``[B, buckets]`` of each row's n-grams, n = 1..``max_n``, over ids ``[B, L]`` right-padded with
    ``pad_id``: the n-gram ``(w_1 .. w_n)`` counts in bucket ``(sum_i w_i base^(n-i) + n - 1) mod buckets``
    (a unigram ``w`` in ``w mod buckets``); n-grams that reach into the padding are left out."""
    if ids.dim() != 2 or not 1 <= max_n <= MAX_N:
        raise ValueError(f"ids must be [B, L] and max_n in 1..{MAX_N}, got shape {tuple(ids.shape)} and "
                         f"max_n={max_n}")
    real = ids != pad_id
    bag = torch.zeros(len(ids), buckets, device=ids.device)
    for n in range(1, min(max_n, ids.shape[1]) + 1):
        width = ids.shape[1] - n + 1
        code = torch.zeros(len(ids), width, dtype=torch.long, device=ids.device)
        inside = torch.ones_like(code, dtype=torch.bool)
        for offset in range(n):
            code = code * NGRAM_HASH_BASE + ids[:, offset:offset + width]
            inside &= real[:, offset:offset + width]
        code = (code + n - 1) % buckets
        bag.scatter_add_(1, code, inside.float())
    return bag


def bag_of_words_loss(logits: torch.Tensor, bag: torch.Tensor) -> torch.Tensor:
    """``L_bow``: the mean over rows of ``-sum_w bag_w log softmax(logits)_w / sum_w bag_w``
    (``logits, bag [B, buckets]``; every row's bag holds at least one entry)."""
    if logits.shape != bag.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and bag {tuple(bag.shape)} differ in shape")
    counts = bag.sum(dim=1)
    if bool((counts <= 0).any()):
        raise ValueError("every row's bag must hold at least one word")
    return -((bag * F.log_softmax(logits.float(), dim=1)).sum(dim=1) / counts).mean()
