"""What a sentence's meaning allows next, token by token (spec 004 P4's content accuracy).

A latent trained to agree across paraphrases (P2) cannot know which of its scene's wordings it came from:
"two red cubes are on a blue ball" and "a blue sphere is under a pair of red blocks" should give it the
same ``V``. A decoder reading that latent under teacher forcing can therefore know the meaning of the
next token, but not always its surface choice (which synonym, which voice, which count word). These tables
score it on the first: at every position, the tokens some realization of the same scene graph writes
after the same prefix. They come from the grammar itself: parse the sentence back to its scene
(``text.blocks.parser``), realize it under many styles (``text.blocks.sentences``), and read the
continuations off the prefix tree of their token ids. The same tree gives the best a meaning-only
decoder can do on the exact tokens: at each position, the most common continuation.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer

from text.blocks.parser import parse
from text.blocks.sentences import random_style, realize
from text.tokenizer import EOS_ID

NO_TOKEN = -1  # padding of the continuation sets


def realizations(sentence: str, num_styles: int, rng: random.Random) -> set[str]:
    """The distinct sentences among ``num_styles`` random styles of ``sentence``'s scene, and ``sentence``."""
    scene = parse(sentence)
    return {realize(scene, random_style(rng)) for _ in range(num_styles)} | {sentence}


def continuation_tables(tokenizer: Tokenizer, sentences: Sequence[str], length: int, num_styles: int = 256,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """For each sentence's decoder targets ``w_1 .. w_n EOS`` (``length`` columns, those past EOS empty):

    - ``accepted [N, length, K]``: the token ids (padded with ``NO_TOKEN``) that some realization of the
      sentence's scene writes after the sentence's own prefix ``BOS w_1 .. w_t``;
    - ``best [N, length]``: the one most of those distinct realizations write (ties: the smallest id),
      ``NO_TOKEN`` past EOS;
    - ``parsed [N]``: whether the sentence is in the grammar (parsed and realized again). One that is not
      has only its own tokens as continuations, so on it the tables score the exact tokens.

    Realizations are sampled (``num_styles`` styles per sentence, from ``seed``), so a rare continuation
    may be missing: the sets err towards the exact tokens.
    """
    rng = random.Random(seed)
    rows, parsed = [], []
    for sentence in sentences:
        try:
            realized = realizations(sentence, num_styles, rng)
        except ValueError:  # outside the grammar, or a scene it cannot realize
            realized = None
        parsed.append(realized is not None)
        realized = realized or {sentence}
        rows.append(_continuations(tokenizer, sentence, realized, length))
    width = max((len(counts) for row in rows for counts in row), default=1)
    accepted = torch.full((len(sentences), length, width), NO_TOKEN, dtype=torch.long)
    best = torch.full((len(sentences), length), NO_TOKEN, dtype=torch.long)
    for index, row in enumerate(rows):
        for position, counts in enumerate(row):
            accepted[index, position, : len(counts)] = torch.tensor(sorted(counts))
            best[index, position] = min(counts, key=lambda token: (-counts[token], token))
    return {"accepted": accepted, "best": best, "parsed": torch.tensor(parsed, dtype=torch.bool)}


def _continuations(tokenizer: Tokenizer, sentence: str, realized: set[str], length: int) -> list[Counter]:
    """Per target position of ``sentence``, how often each token follows its prefix among ``realized``."""
    encodings = tokenizer.encode_batch([sentence, *sorted(realized)], add_special_tokens=False)
    target, *others = ([*encoding.ids, EOS_ID] for encoding in encodings)
    if len(target) > length:
        raise ValueError(f"sentence {sentence!r} has {len(target)} decoder targets, more than {length}")
    counts = [Counter() for _ in target]
    for ids in others:
        for position, token in enumerate(ids):
            if position >= len(target) or ids[:position] != target[:position]:
                break
            counts[position][token] += 1
    return counts
