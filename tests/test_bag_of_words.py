"""The bag-of-words term: n-gram bags counted by hand, the loss against hand-computed values, its refusals."""

from __future__ import annotations

import math

import pytest
import torch

from modules.losses.bag_of_words import NGRAM_HASH_BASE, bag_of_words_loss, ngram_bag


def test_unigram_bag_counts_each_word_and_skips_padding():
    ids = torch.tensor([[5, 6, 5, 0], [7, 0, 0, 0]])
    expected = torch.zeros(2, 16)
    expected[0, 5], expected[0, 6], expected[1, 7] = 2, 1, 1
    assert torch.equal(ngram_bag(ids, pad_id=0, max_n=1, buckets=16), expected)


def test_bigrams_hash_into_their_buckets_and_stop_at_the_padding():
    ids = torch.tensor([[5, 6, 7, 0], [5, 0, 0, 0]])
    bag = ngram_bag(ids, pad_id=0, max_n=2, buckets=16)
    # (5, 6) -> (5 * base + 6 + 1) mod 16 = 6, which word 6 also fills; (6, 7) -> 10; (7, PAD) is left out
    assert (5 * NGRAM_HASH_BASE + 7) % 16 == 6 and (6 * NGRAM_HASH_BASE + 8) % 16 == 10
    expected = torch.zeros(2, 16)
    expected[0, [5, 6, 7, 10]] = torch.tensor([1.0, 2.0, 1.0, 1.0])
    expected[1, 5] = 1
    assert torch.equal(bag, expected)


def test_trigrams_add_one_per_window_in_their_buckets():
    ids = torch.tensor([[3, 4, 5, 6]])
    counts = [ngram_bag(ids, 0, n, 1 << 20).sum().item() for n in (1, 2, 3)]
    assert counts == [4, 4 + 3, 4 + 3 + 2]
    # (3, 4, 5) -> (3 base^2 + 4 base + 5 + 2) mod 1000, with base mod 1000 = 3: (27 + 12 + 7) = 46;
    # (4, 5, 6) -> (36 + 15 + 8) = 59
    trigrams = ngram_bag(ids, 0, 3, 1000) - ngram_bag(ids, 0, 2, 1000)
    assert NGRAM_HASH_BASE % 1000 == 3 and trigrams.nonzero()[:, 1].tolist() == [46, 59]


def test_loss_is_the_mean_negative_log_probability_of_the_bag():
    bag = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    # row 0: p = (1/4, 3/4), -(log 1/4 + log 3/4) / 2; row 1: p = (1/2, 1/2), -log 1/2
    expected = 0.5 * (-(math.log(0.25) + math.log(0.75)) / 2 + math.log(2.0))
    assert bag_of_words_loss(logits, bag).item() == pytest.approx(expected, rel=1e-6)
    assert bag_of_words_loss(torch.zeros(3, 8), torch.ones(3, 8)).item() == pytest.approx(math.log(8.0), rel=1e-6)


def test_refusals_name_the_fault():
    with pytest.raises(ValueError, match="max_n in 1..3"):
        ngram_bag(torch.ones(2, 5, dtype=torch.long), 0, 4, 16)
    with pytest.raises(ValueError, match="differ in shape"):
        bag_of_words_loss(torch.zeros(2, 8), torch.ones(2, 4))
    with pytest.raises(ValueError, match="at least one word"):
        bag_of_words_loss(torch.zeros(2, 4), torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
