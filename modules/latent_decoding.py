"""Spec 004 P4's decoding of a latent back to its sentence, per evaluation batch: teacher-forced
cross-entropy and argmax accuracy for content and function tokens, the same cross-entropy and content
accuracy on the spatially shuffled latent (its readout recomputed: the decoder reads ``D(V(x))``), the
content accuracy on another sentence's latent, and how concentrated each content token's attention over
the grid is. Per-row sums, so that the split's totals add up over
batches of different widths and over ranks (``summarize``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modules.losses.decoding import attention_concentration, masked_logits, shuffle_pixels, teacher_forcing
from modules.networks.text_decoder import hide_tokens
from text.blocks.sentences import CONTENT_KINDS, FUNCTION_TOKEN
from text.tokenizer import BOS_ID, EOS_ID, PAD_ID

SHUFFLE_SEED = 0


def frame_for_decoder(ids: torch.Tensor) -> torch.Tensor:
    """Encoder ids ``[B, L]`` (right-padded, no specials) as ``BOS w_1 .. w_n EOS PAD ..`` ``[B, L + 2]``."""
    framed = F.pad(ids, (1, 1), value=PAD_ID)
    framed[:, 0] = BOS_ID
    lengths = (ids != PAD_ID).sum(dim=1, keepdim=True)
    return framed.scatter(1, lengths + 1, EOS_ID)


def decoder_logits(
    decoder, framed: torch.Tensor, v: torch.Tensor, z: torch.Tensor, allowed: torch.Tensor | None,
    hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)`` of teacher forcing on ``framed`` ids, restricted to ``allowed`` tokens if given;
    the prefix's ``hidden`` tokens are not shown to the decoder
    (``modules.networks.text_decoder.hide_tokens``), though it must still write them."""
    inputs, targets = teacher_forcing(framed)
    logits = decoder(hide_tokens(inputs, hidden, BOS_ID), v, z)
    return (logits if allowed is None else masked_logits(logits, allowed)), targets


def _row_sums(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Sums over the selected entries of each row (padding's masked logits make inf entries elsewhere)."""
    return torch.where(where, values, 0.0).sum(dim=1)


def _meaning_hits(logits: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """1 where the argmax of ``logits [B, L, vocab]`` is among the tokens ``accepted [B, L, K]`` there, else 0."""
    return (logits.argmax(dim=-1).unsqueeze(-1) == accepted).any(dim=-1).float()


def grid_attention(decoder, framed: torch.Tensor, v: torch.Tensor, z: torch.Tensor,
                   hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The last block's attention ``[B, L + 1, H W]`` of each target's position in ``framed`` over the grid's
    pixels: heads averaged, the ``z`` token dropped, a patch's weight shared by its pixels
    (``LatentMemory.over_pixels``), the prefix's ``hidden`` tokens not shown (``decoder_logits``)."""
    weights = decoder.cross_attention(hide_tokens(framed[:, :-1], hidden, BOS_ID), v, z).mean(dim=1)[..., 1:]
    return decoder.memory.over_pixels(weights)


@torch.no_grad()
def decoding_rows(decoder, readout, ids: torch.Tensor, v: torch.Tensor, z: torch.Tensor,
                  allowed: torch.Tensor | None, content_kinds: torch.Tensor, accepted: torch.Tensor,
                  best_continuation: torch.Tensor,
                  hidden: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per sentence ``[B]``: counts and sums the split's decoding metrics are ratios of.

    ``content_kinds [vocab]`` gives each token's index in ``CONTENT_KINDS``, ``FUNCTION_TOKEN`` for a function
    token or ``NO_SINGLE_KIND`` (``text.blocks.sentences``; ``modules.visual_latent.content_kind_table``).

    A prediction is a hit when the sentence's meaning allows it there (``accepted [B, L + 1, K]``, the
    continuations of ``text.blocks.continuations``), an exact hit when it is the sentence's own token; the
    ceiling of exact hits for a decoder that knows the meaning but not the wording is how often
    ``best_continuation [B, L + 1]`` is the sentence's own token. ``hidden`` tokens of the prefix are not
    shown to the decoder (``decoder_logits``).
    """
    framed = frame_for_decoder(ids)
    logits, targets = decoder_logits(decoder, framed, v, z, allowed, hidden)
    real = targets != PAD_ID
    kinds = content_kinds.to(targets.device)[targets]
    content = (kinds != FUNCTION_TOKEN) & real
    function = real & ~content
    cross_entropy = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")
    predicted = logits.argmax(dim=-1)
    exact_hits = (predicted == targets).float()
    hits = _meaning_hits(logits, accepted)
    ceiling_hits = (best_continuation == targets).float()
    shuffled = shuffle_pixels(v, torch.Generator(device=v.device).manual_seed(SHUFFLE_SEED))
    shuffled_logits, _ = decoder_logits(decoder, framed, shuffled, readout(shuffled), allowed, hidden)
    shuffled_entropy = F.cross_entropy(shuffled_logits.transpose(1, 2).float(), targets, reduction="none")
    shuffled_hits = _meaning_hits(shuffled_logits, accepted)
    # each sentence read from the latent of the one before it: what the prefix gives without its own latent
    wrong_logits, _ = decoder_logits(decoder, framed, v.roll(1, dims=0), z.roll(1, dims=0), allowed, hidden)
    wrong_hits = _meaning_hits(wrong_logits, accepted)
    wrong_content = content & (len(v) > 1)  # a batch of one has no other latent
    attention = attention_concentration(grid_attention(decoder, framed, v, z, hidden))
    by_kind = {}
    for index, kind in enumerate(CONTENT_KINDS):
        of_kind = (kinds == index) & real
        by_kind[f"content_{kind}_tokens"] = of_kind.sum(dim=1).float()
        by_kind[f"content_{kind}_hits"] = _row_sums(hits, of_kind)
    return by_kind | {
        "tokens": real.sum(dim=1).float(), "content_tokens": content.sum(dim=1).float(),
        "function_tokens": function.sum(dim=1).float(),
        "content_hits": _row_sums(hits, content), "function_hits": _row_sums(hits, function),
        "content_shuffled_hits": _row_sums(shuffled_hits, content),
        "wrong_latent_content_tokens": wrong_content.sum(dim=1).float(),
        "content_wrong_latent_hits": _row_sums(wrong_hits, wrong_content),
        "content_exact_hits": _row_sums(exact_hits, content), "content_ceiling_hits": _row_sums(ceiling_hits, content),
        "cross_entropy": _row_sums(cross_entropy, real), "content_cross_entropy": _row_sums(cross_entropy, content),
        "function_cross_entropy": _row_sums(cross_entropy, function),
        "shuffled_cross_entropy": _row_sums(shuffled_entropy, real),
        "content_attention_entropy": _row_sums(attention["entropy"], content),
        "content_attention_peak": _row_sums(attention["peak"], content),
    }


def summarize(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The split's decoding metrics from the per-row sums of ``decoding_rows`` (all rows, all ranks):
    ``content_accuracy`` and ``function_accuracy`` (hits the meaning allows), ``content_exact_accuracy`` (the
    sentence's own tokens, the spec's literal measure) and its ``content_exact_ceiling`` for a decoder that
    knows the meaning and not the wording, ``content_accuracy_shuffled`` (read from the shuffled latent) and
    ``content_accuracy_wrong_latent`` (each sentence read from the latent of the one before it in its batch, on
    its rank: what the teacher-forced prefix gives without the sentence's own latent; a foreign latent also
    pulls towards the other scene's words, so this floor may lie below the prefix's own, and the latent's share
    of ``content_accuracy`` above it is an upper estimate), ``cross_entropy`` (per token) and its content and
    function parts, ``shuffle_ce_increase`` (relative), ``content_attention_entropy`` (in units of the
    uniform's) and ``content_attention_peak`` (the peak weight over the uniform's); ``content_accuracy_{kind}``
    per kind of ``CONTENT_KINDS`` (colors, shapes, counts, relation words; NaN where the split has none)."""
    total = {name: values.sum() for name, values in rows.items()}
    tokens, content, function = total["tokens"], total["content_tokens"], total["function_tokens"]
    cross_entropy = total["cross_entropy"] / tokens
    return {
        "content_accuracy": total["content_hits"] / content, "function_accuracy": total["function_hits"] / function,
        "content_exact_accuracy": total["content_exact_hits"] / content,
        "content_accuracy_shuffled": total["content_shuffled_hits"] / content,
        "content_accuracy_wrong_latent": (total["content_wrong_latent_hits"]
                                          / total["wrong_latent_content_tokens"]),
        "content_exact_ceiling": total["content_ceiling_hits"] / content,
        "cross_entropy": cross_entropy, "content_cross_entropy": total["content_cross_entropy"] / content,
        "function_cross_entropy": total["function_cross_entropy"] / function,
        "shuffle_ce_increase": total["shuffled_cross_entropy"] / tokens / cross_entropy - 1,
        "content_attention_entropy": total["content_attention_entropy"] / content,
        "content_attention_peak": total["content_attention_peak"] / content,
    } | {f"content_accuracy_{kind}": total[f"content_{kind}_hits"] / total[f"content_{kind}_tokens"]
         for kind in CONTENT_KINDS}
