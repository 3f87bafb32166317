"""Byte-level BPE trained on the corpus (spec 004, "Tokenizer"), with the ``tokenizers`` library.

The tokenizer is part of the model: its JSON travels in every checkpoint and is written next to
the run, so evaluation and resumed runs read the ids the encoder was trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2; BOS/EOS are reserved for the decoder phases
PAD_ID = 0


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


def encode(tokenizer: Tokenizer, sentences: Sequence[str], max_length: int) -> torch.Tensor:
    """Ids ``[N, max_length]`` right-padded with ``PAD_ID``; a sentence longer than ``max_length``
    tokens is an error, never a silent truncation that would change its meaning."""
    encodings = tokenizer.encode_batch(list(sentences))
    ids = torch.full((len(sentences), max_length), PAD_ID, dtype=torch.long)
    for row, (sentence, encoding) in enumerate(zip(sentences, encodings)):
        if len(encoding.ids) > max_length:
            raise ValueError(
                f"sentence {sentence!r} has {len(encoding.ids)} tokens, more than max_length={max_length}"
            )
        if not encoding.ids:
            raise ValueError(f"sentence {row} is empty")
        ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
    return ids


def trim_padding(ids: torch.Tensor) -> torch.Tensor:
    """Drop the trailing columns that are padding in every row (``[..., L]`` -> ``[..., L']``)."""
    length = int((ids != PAD_ID).flatten(0, -2).sum(-1).max())
    return ids[..., :length]
