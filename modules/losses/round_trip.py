"""Spec 004 P5's added terms as pure functions: the choice of the best of ``k`` free-run candidates by
``cos(g(V(x)), g(V(x_hat)))``, the round-trip term ``L_cycle`` and copy suppression ``L_copySuppress``.

Copy suppression is unlikelihood training on copied n-grams (Welleck et al., ICLR 2020, sequence-level
unlikelihood with n-gram candidates): every token of a free-run sample that completes an n-gram the input
also contains gets ``-log(1 - p(token | prefix, V))`` under teacher forcing on the sample, so the penalty
reaches the decoder's logits at exactly the decisions that made the copy. The first ``n - 1`` tokens of a
copied n-gram are shared with many sentences that copy nothing, so only the completing token is penalized,
and a copied span of ``m >= n`` tokens is penalized ``m - n + 1`` times: the longer the copy, the larger the
penalty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text.tokenizer import EOS_ID, PAD_ID

NO_OTHER_TOKEN = -1e4  # the logit a token stands in for the rest with, against -inf masked logits


def copied_ngram_ends(sample: torch.Tensor, source: torch.Tensor, n: int) -> torch.Tensor:
    """Bool ``[B, L]``: where a token of ``sample [B, L]`` completes an n-gram of words (no PAD or EOS) that its
    row of ``source [B, S]`` also contains."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if sample.shape[1] < n or source.shape[1] < n:
        return torch.zeros_like(sample, dtype=torch.bool)
    sample_grams, source_grams = sample.unfold(1, n, 1), source.unfold(1, n, 1)  # [B, L - n + 1, n], [B, S', n]
    real_sample, real_source = (_is_word(sample_grams).all(-1), _is_word(source_grams).all(-1))
    same = (sample_grams.unsqueeze(2) == source_grams.unsqueeze(1)).all(-1) & real_source.unsqueeze(1)
    return F.pad(same.any(-1) & real_sample, (n - 1, 0), value=False)


def _is_word(ids: torch.Tensor) -> torch.Tensor:
    return (ids != PAD_ID) & (ids != EOS_ID)


def ngram_overlap(sample: torch.Tensor, source: torch.Tensor, n: int) -> torch.Tensor:
    """Per row ``[B]``: the share of the sample's word n-grams that its source contains (0 for a sample with
    none)."""
    grams = _is_word(sample.unfold(1, n, 1)).all(-1).sum(-1) if sample.shape[1] >= n else sample.new_zeros(len(sample))
    return copied_ngram_ends(sample, source, n).sum(-1) / grams.clamp(min=1)


def copy_unlikelihood(logits: torch.Tensor, targets: torch.Tensor, copied: torch.Tensor) -> torch.Tensor:
    """``mean over copied positions of -log(1 - p(target))`` for teacher-forced ``logits [B, L, vocab]`` on the
    sample ``targets [B, L]``; 0 when nothing is copied. ``log(1 - p)`` is the log-sum-exp of every other
    token's logit less that of all, so a near-certain copy keeps a finite penalty and its gradient (``1 - p``
    rounded to 0 would lose both)."""
    logits = logits.float()
    target_at = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, targets.unsqueeze(-1), True)
    # a finite fill: a row whose other tokens are all masked (-inf) would give NaN gradients at -inf
    log_rest = logits.masked_fill(target_at, NO_OTHER_TOKEN).logsumexp(dim=-1)
    penalty = logits.logsumexp(dim=-1) - log_rest  # -log(1 - p)
    return torch.where(copied, penalty, 0.0).sum() / copied.sum().clamp(min=1)


def best_of_k(z_source: torch.Tensor, z_candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [B], cosines [B, k])``: for each source ``z [B, E]`` the candidate of ``z_candidates [B, k, E]``
    whose embedding is closest in direction (spec P5: "choose best by sim(g(V(x)), g(V(x_hat)))")."""
    if z_candidates.dim() != 3 or z_candidates.shape[0] != z_source.shape[0] or \
            z_candidates.shape[2] != z_source.shape[1]:
        raise ValueError(f"z_candidates must be [B, k, E] for z_source [B, E] = {tuple(z_source.shape)}, got "
                         f"{tuple(z_candidates.shape)}")
    cosines = F.cosine_similarity(z_source.unsqueeze(1), z_candidates, dim=-1)
    return cosines.argmax(dim=1), cosines


def round_trip_cosine_loss(z_source: torch.Tensor, z_chosen: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``1 - cos(g(V(x)), g(V(x_hat)))`` averaged over the ``kept [B]`` rows (0 when none is): the round trip's
    latent term, through both encodings."""
    distance = 1 - F.cosine_similarity(z_source, z_chosen, dim=-1)
    return torch.where(kept, distance, 0.0).sum() / kept.sum().clamp(min=1)
