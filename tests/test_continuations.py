"""What a sentence's meaning allows next (P4's content accuracy): hand-made cases on the block grammar."""

from __future__ import annotations

import random

import pytest
import torch

from text.blocks.continuations import NO_TOKEN, continuation_tables, realizations
from text.blocks.eval_pack import load_eval_pack
from text.blocks.parser import parse
from text.tokenizer import EOS_ID, PAD_ID, encode, train_bpe

SENTENCE = "a red cube is on a blue ball."


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [sentence for _ in range(3) for sentence in realizations(SENTENCE, 400, random.Random(0))]
    return train_bpe(corpus, vocab_size=400)


def word_token(tokenizer, word: str) -> int:
    """The single token a word after a space is written as (the BPE above learned every word whole)."""
    token = tokenizer.token_to_id("Ġ" + word)
    assert token is not None, f"{word!r} is not one token"
    return token


def test_every_realization_means_the_same_and_the_sentence_is_among_them():
    realized = realizations(SENTENCE, 400, random.Random(0))
    assert SENTENCE in realized and len(realized) > 20
    assert {parse(sentence) for sentence in realized} == {parse(SENTENCE)}


def test_continuations_by_hand(tokenizer):
    tables = continuation_tables(tokenizer, [SENTENCE], 16, num_styles=400)
    accepted, best = tables["accepted"][0], tables["best"][0]
    words = SENTENCE.removesuffix(".").split()
    ids = encode(tokenizer, [SENTENCE], 16)[0]
    targets = [*ids[ids != PAD_ID].tolist(), EOS_ID]
    assert [tokenizer.id_to_token(i).lstrip("Ġ") for i in targets[:-2]] == words  # one token per word
    allowed = [set(row[row != NO_TOKEN].tolist()) for row in accepted]
    # the sentence's own token is always allowed, and so is the most common continuation
    assert all(target in allowed[t] and best[t].item() in allowed[t] for t, target in enumerate(targets))
    assert allowed[len(targets)] == set() and best[len(targets)] == NO_TOKEN  # past EOS
    token = lambda word: word_token(tokenizer, word)  # noqa: E731
    # after "a": either group's color (the blue ball can come first, "a blue ball supports ..") or "single"
    # ("a single red cube .."), never another color
    assert allowed[1] == {token("red"), token("blue"), token("single")}
    # after "a red": the cube, by either name
    assert allowed[2] == {token("cube"), token("block")}
    # after "a red cube is": the relation's words in the subject-first voices only ("on", "supported by")
    assert token("on") in allowed[4] and token("supported") in allowed[4] and token("under") not in allowed[4]
    # after "a red cube is on a": only the ball's color, or "single"
    assert allowed[6] == {token("blue"), token("single")}
    assert allowed[0] == {token("a"), token("one")}  # "a single" starts with "a"; both groups are one
    assert tables["parsed"].tolist() == [True]


def test_a_sentence_outside_the_grammar_has_only_its_own_tokens(tokenizer):
    sentence = "a red cube is near a blue ball."
    tables = continuation_tables(tokenizer, [sentence], 16)
    ids = encode(tokenizer, [sentence], 16)[0]
    targets = torch.tensor([*ids[ids != PAD_ID].tolist(), EOS_ID])
    accepted = tables["accepted"][0, : len(targets)]
    assert tables["parsed"].tolist() == [False]
    assert torch.equal(accepted[:, 0], targets) and bool((accepted[:, 1:] == NO_TOKEN).all())
    assert torch.equal(tables["best"][0, : len(targets)], targets)


def test_too_long_a_sentence_is_refused(tokenizer):
    with pytest.raises(ValueError, match="more than 4"):
        continuation_tables(tokenizer, [SENTENCE], 4)


def test_every_pack_sentence_is_realized_again():
    pack = load_eval_pack()
    rng = random.Random(0)
    assert all(item["sentence"] in realizations(item["sentence"], 8, rng) for item in pack["val"][:50])
