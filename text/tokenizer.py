"""Byte-level BPE trained on the corpus (spec 004, "Tokenizer"), with the ``tokenizers`` library.

The tokenizer is part of the model: its JSON travels in every checkpoint and is written next to
the run, so evaluation and resumed runs read the ids the encoder was trained on. ``<bos>`` and
``<eos>`` frame the sentences a decoder learns to write (issue 9, item 4); the encoder reads
sentences without them, so its ids are the same with or without a decoder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # trained first, so they hold ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_bpe(sentences: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE with at most ``vocab_size`` ids (fewer when the corpus has fewer merges)."""
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} must exceed the 256 byte symbols plus {len(SPECIAL_TOKENS)} specials"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences, trainer=trainer)
    return tokenizer


def _check_special_ids(tokenizer: Tokenizer) -> None:
    found = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    if found != dict(zip(SPECIAL_TOKENS, (PAD_ID, BOS_ID, EOS_ID))):
        raise ValueError(f"the tokenizer's special tokens have ids {found}; expected "
                         f"{PAD}={PAD_ID}, {BOS}={BOS_ID}, {EOS}={EOS_ID} (train it with train_bpe)")


def _encoder(tokenizer: Tokenizer, max_length: int, add_bos_eos: bool) -> Tokenizer:
    """A copy of ``tokenizer`` that pads and truncates to ``max_length`` and, if asked, frames each
    sentence as ``<bos> ... <eos>``; the trained tokenizer (saved in checkpoints) is left as it is."""
    _check_special_ids(tokenizer)
    encoder = Tokenizer.from_str(tokenizer.to_str())
    if add_bos_eos:
        encoder.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)]
        )
    encoder.enable_padding(pad_id=PAD_ID, pad_token=PAD, length=max_length)
    encoder.enable_truncation(max_length)
    return encoder


def encode(tokenizer: Tokenizer, sentences: Sequence[str], max_length: int, add_bos_eos: bool = False) -> torch.Tensor:
    """Ids ``[N, max_length]`` right-padded with ``PAD_ID``, each sentence framed by ``BOS_ID`` and
    ``EOS_ID`` when ``add_bos_eos`` (the decoder's targets). A sentence longer than ``max_length``
    tokens (its specials included) is an error, never a silent truncation that would change its meaning."""
    encodings = _encoder(tokenizer, max_length, add_bos_eos).encode_batch(list(sentences), add_special_tokens=add_bos_eos)
    for row, (sentence, encoding) in enumerate(zip(sentences, encodings)):
        if encoding.overflowing:
            length = len(tokenizer.encode(sentence, add_special_tokens=False).ids) + 2 * add_bos_eos
            raise ValueError(f"sentence {sentence!r} has {length} tokens, more than max_length={max_length}")
        if 0 not in encoding.special_tokens_mask:
            raise ValueError(f"sentence {row} is empty")
    return torch.tensor([encoding.ids for encoding in encodings], dtype=torch.long).view(len(encodings), max_length)


def decode(tokenizer: Tokenizer, ids: torch.Tensor) -> list[str]:
    """Sentences of ids ``[N, L]``: each row is read up to its first ``EOS_ID`` (what a decoder
    generates after it is not part of the sentence), without ``BOS_ID`` and padding."""
    rows = []
    for row in ids.tolist():
        rows.append(row[: row.index(EOS_ID)] if EOS_ID in row else row)
    return [sentence.strip() for sentence in tokenizer.decode_batch(rows, skip_special_tokens=True)]


def trim_padding(ids: torch.Tensor) -> torch.Tensor:
    """Drop the trailing columns that are padding in every row (``[..., L]`` -> ``[..., L']``).

    Reads the length back from ``ids``' device: meant for host tensors (whole tables at encoding
    time), not for batches on an accelerator."""
    length = int((ids != PAD_ID).flatten(0, -2).sum(-1).max())
    return ids[..., :length]


def join_padded(*id_batches: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Batches of ids ``[B_i, L_i]`` right-padded to their longest and stacked, ``[sum B_i, max L_i]``, with each
    batch's row count: one encoder pass over them, split back by ``.split(sizes)``."""
    length = max(ids.shape[-1] for ids in id_batches)
    joined = torch.cat([torch.nn.functional.pad(ids, (0, length - ids.shape[-1]), value=PAD_ID) for ids in id_batches])
    return joined, [len(ids) for ids in id_batches]


def content_token_table(tokenizer: Tokenizer, sentences: Sequence[str], content_words: frozenset[str]) -> torch.Tensor:
    """Per token id, whether it is a content token ``[vocab]`` (bool): most of its occurrences in
    ``sentences`` lie in a word of ``content_words`` (a byte-level piece is classed by the word it falls
    in; punctuation and specials are function tokens)."""
    return word_set_majorities(tokenizer, sentences, [content_words])[:, 0]


def word_set_majorities(tokenizer: Tokenizer, sentences: Sequence[str],
                        word_sets: Sequence[frozenset[str]]) -> torch.Tensor:
    """``Bool [vocab, len(word_sets)]``: per token id and set, whether most of the token's occurrences in
    ``sentences`` lie in a word of the set (a byte-level piece lies in the word it overlaps; punctuation and
    specials in none), in one pass over the tokenized sentences."""
    tokens, memberships = [], []
    nowhere = (False,) * len(word_sets)
    for sentence, encoding in zip(sentences, tokenizer.encode_batch(list(sentences), add_special_tokens=False)):
        words = [(match.start(), match.end(), tuple(match.group() in word_set for word_set in word_sets))
                 for match in re.finditer(r"[a-z0-9]+", sentence.lower())]
        for token, (start, end) in zip(encoding.ids, encoding.offsets):
            tokens.append(token)
            memberships.append(next((sets for first, last, sets in words if first < end and start < last), nowhere))
    vocab = tokenizer.get_vocab_size()
    tokens = torch.tensor(tokens, dtype=torch.long)
    memberships = torch.tensor(memberships, dtype=torch.float).view(len(tokens), len(word_sets))
    inside = torch.zeros(vocab, len(word_sets)).index_add_(0, tokens, memberships)
    occurrences = torch.bincount(tokens, minlength=vocab).float().unsqueeze(1)
    return inside > occurrences - inside
