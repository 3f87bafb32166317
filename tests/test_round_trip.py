"""Spec 004 P5's pieces by hand: Graph F1 on hand-made pairs, the copied n-grams and their unlikelihood penalty,
best-of-k, nucleus sampling inside the vocabulary mask, and decoder ids read back as encoder ids."""

from __future__ import annotations

import math

import pytest
import torch

from modules.losses.round_trip import best_of_k, copied_ngram_ends, copy_unlikelihood, ngram_overlap
from modules.networks.text_decoder import nucleus_logits
from modules.round_trip import check_round_trips, encoder_ids, round_trip_cosines, summarize_round_trips
from tests.test_decoding import small_decoder, written_before_eos
from text.blocks import parse
from text.blocks.checker import check_graph, fact_f1, graph_facts
from text.tokenizer import BOS_ID, EOS_ID, PAD_ID, encode, train_bpe

SOURCE = "a red cube is on a blue ball."


def test_graph_f1_scores_a_paraphrase_above_a_swapped_relation_and_an_unreadable_sentence_zero():
    source = parse(SOURCE)
    assert graph_facts(source) == {("group", "red", "cube", 1), ("group", "blue", "ball", 1),
                                   ("relation", "on", "red", "cube", "blue", "ball")}
    # the inverse relation in the other voice, with shape synonyms: the same three facts
    assert check_graph(source, "a blue sphere is under a red block.").f1 == 1.0
    # swapped arguments: both groups right, the relation wrong: 2 * 2 / (3 + 3)
    assert check_graph(source, "a blue ball is on a red cube.").f1 == pytest.approx(2 / 3)
    # a wrong count breaks one group fact; the relation names groups by color and shape, so it still holds
    assert check_graph(source, "2 red cubes are on a blue ball.").f1 == pytest.approx(2 / 3)
    # one fact too many: precision 3/4, recall 1
    assert check_graph(source, SOURCE[:-1] + ", and a green ring is also present.").f1 == pytest.approx(6 / 7)
    unread = check_graph(source, "a red cube is on a red cube.")  # a relation of a group to itself
    assert unread.f1 == 0.0 and not unread.parsed
    assert fact_f1(frozenset(), frozenset()) == 1.0 and fact_f1(frozenset({1}), frozenset({2})) == 0.0


def test_copied_ngrams_and_their_overlap_by_hand():
    source = torch.tensor([[5, 6, 7, 8, 9, PAD_ID], [5, 6, 7, PAD_ID, PAD_ID, PAD_ID]])
    sample = torch.tensor([[5, 6, 7, 8, 3, EOS_ID], [7, 5, 6, 7, EOS_ID, PAD_ID]])
    copied = copied_ngram_ends(sample, source, 3)
    # row 0: (5 6 7) ends at 2, (6 7 8) at 3, (7 8 3) is new; row 1: (7 5 6) is new, (5 6 7) ends at 3
    assert copied.tolist() == [[False, False, True, True, False, False], [False, False, False, True, False, False]]
    # word 3-grams: row 0 has 3 (5 6 7, 6 7 8, 7 8 3), row 1 has 2 (7 5 6, 5 6 7)
    torch.testing.assert_close(ngram_overlap(sample, source, 3), torch.tensor([2 / 3, 1 / 2]))
    # n-grams across the end or the padding are not words, and n longer than the rows copies nothing
    assert not copied_ngram_ends(torch.tensor([[9, EOS_ID, 5]]), torch.tensor([[9, EOS_ID, 5]]), 2).any()
    assert not copied_ngram_ends(sample, source, 7).any()


def test_copy_unlikelihood_by_hand_and_its_gradient_lowers_the_copied_token():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], requires_grad=True)
    targets = torch.tensor([[0, 1]])
    copied = torch.tensor([[True, False]])
    p = math.exp(2) / (math.exp(2) + 2)  # the copied token's probability
    loss = copy_unlikelihood(logits, targets, copied)
    assert loss.item() == pytest.approx(-math.log(1 - p), rel=1e-5)
    loss.backward()
    assert logits.grad[0, 0, 0] > 0 and torch.all(logits.grad[0, 1] == 0)  # only the copy is pushed down
    both = copy_unlikelihood(logits, targets, torch.tensor([[True, True]]))
    p_second = math.e / (math.e + 2)
    assert both.item() == pytest.approx(-(math.log(1 - p) + math.log(1 - p_second)) / 2, rel=1e-5)
    assert copy_unlikelihood(logits, targets, torch.zeros_like(copied)).item() == 0.0
    # a near-certain copy keeps its penalty and its gradient; masked logits and padding give no NaN
    sure = torch.tensor([[[40.0, 0.0, float("-inf")], [float("-inf"), float("-inf"), 0.0]]], requires_grad=True)
    loss = copy_unlikelihood(sure, torch.tensor([[0, PAD_ID]]), torch.tensor([[True, False]]))
    assert loss.item() == pytest.approx(40.0, rel=1e-4)  # -log(1 - p) = log(1 + e^40)
    loss.backward()
    assert torch.isfinite(sure.grad).all() and sure.grad[0, 0, 0] > 0.9


def test_best_of_k_chooses_the_highest_cosine():
    z_source = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_candidates = torch.tensor([[[0.0, 1.0], [3.0, 0.5], [-1.0, 0.0]], [[1.0, 1.0], [1.0, 0.0], [0.1, 2.0]]])
    index, cosines = best_of_k(z_source, z_candidates)
    assert index.tolist() == [1, 2]
    torch.testing.assert_close(cosines[0], torch.tensor([0.0, 3 / math.hypot(3, 0.5), -1.0]))
    with pytest.raises(ValueError, match="z_candidates must be"):
        best_of_k(z_source, z_candidates[0])


def test_the_nucleus_by_hand():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()

    def kept(top_p: float) -> list[bool]:
        return torch.isfinite(nucleus_logits(logits, top_p)).tolist()

    assert kept(0.7) == [True, True, False, False]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True] * 4
    shuffled = logits[[2, 0, 3, 1]]  # the nucleus follows the probabilities, not the order of the ids
    assert torch.isfinite(nucleus_logits(shuffled, 0.7)).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="top_p must lie in"):
        nucleus_logits(logits, 0.0)


def test_nucleus_sampling_never_leaves_the_vocabulary_mask_and_follows_the_decoder():
    decoder = small_decoder(0, max_length=8, depth=2, dropout=0.1)
    v, z = torch.randn(64, 2, 4, 4), torch.randn(64, 3)
    allowed = torch.zeros(12, dtype=torch.bool)
    allowed[[EOS_ID, 4, 5, 6, 9]] = True
    generator = torch.Generator().manual_seed(1)
    ids = decoder.generate(v, z, BOS_ID, EOS_ID, allowed, top_p=0.5, generator=generator)
    assert decoder.training  # sampled in eval mode, its mode restored
    assert ids.shape == (64, 8) and (ids[:, 0] == BOS_ID).all()
    live = written_before_eos(ids)
    assert (ids[:, 1:][~live] == PAD_ID).all()
    assert allowed[ids[:, 1:][live]].all()
    assert len(set(ids[:, 1].tolist())) > 1  # it samples: not every row writes the argmax
    # every written token lies in the nucleus of the full (uncached) forward pass given its prefix
    decoder.eval()
    prefix = ids[:, :-1].masked_fill(ids[:, :-1] == PAD_ID, EOS_ID)
    logits = decoder(prefix, v, z).masked_fill(~allowed, float("-inf"))
    nucleus = torch.isfinite(nucleus_logits(logits, 0.5))
    assert nucleus.sum(-1).float().mean() < 3  # a small nucleus among the 5 allowed, so the check below can fail
    assert nucleus.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)[live].all()


def test_decoder_ids_are_read_back_as_encoder_ids():
    generated = torch.tensor([[BOS_ID, 7, 8, EOS_ID, PAD_ID, PAD_ID], [BOS_ID, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
                              [BOS_ID, 7, 8, 9, 10, 11]])
    ids, empty = encoder_ids(generated)
    assert ids.tolist() == [[7, 8, PAD_ID, PAD_ID], [EOS_ID, PAD_ID, PAD_ID, PAD_ID], [7, 8, 9, 10]]
    assert empty.tolist() == [False, True, False]


def test_the_checker_reads_decoded_sentences_and_counts_copies_and_unread_ones():
    sentences = [SOURCE, "a blue sphere is under a red block.", "a green ring is present."]
    tokenizer = train_bpe(sentences * 4, vocab_size=300)
    written = ["a red cube is on a blue ball.", "a blue ball is on a red cube.", "a green ring is a."]
    framed = torch.nn.functional.pad(encode(tokenizer, written, 16, add_bos_eos=True), (0, 2), value=PAD_ID)
    scenes = [parse(sentence) for sentence in sentences]
    checks = check_round_trips(tokenizer, framed, sentences, scenes)
    assert checks["text"][0] == written[0]
    torch.testing.assert_close(checks["graph_f1"], torch.tensor([1.0, 2 / 3, 0.0]))
    assert checks["parsed"].tolist() == [True, True, False] and checks["verbatim"].tolist() == [True, False, False]
    assert checks["rouge_l"][0] == 1.0 and 0.0 < checks["rouge_l"][1] < 1.0
    metrics = summarize_round_trips(checks, torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.2, 0.1, 0.0]), scenes)
    assert metrics["graph_f1"].item() == pytest.approx((1 + 2 / 3) / 3)
    assert metrics["unparsed_share"].item() == pytest.approx(1 / 3)
    assert metrics["verbatim_share"].item() == pytest.approx(1 / 3)
    assert metrics["graph_f1_relation_on"].item() == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["graph_f1_relation_none"].item() == 0.0 and "graph_f1_relation_left_of" not in metrics
    assert metrics["round_trip_cosine"].item() == pytest.approx(0.5)
    assert metrics["round_trip_cosine_other"].item() == pytest.approx(0.1)


def test_round_trip_cosines_against_the_own_and_another_sentences_writing():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    written = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 5.0]])
    cosines = round_trip_cosines(z, written, torch.tensor([False, False, True]), "greedy")
    torch.testing.assert_close(cosines["greedy_cosine"], torch.tensor([1.0, 2 ** -0.5, 0.0]))  # an empty one: 0
    # row i against what row i - 1 wrote (row 0 against row 2's, which was empty)
    torch.testing.assert_close(cosines["greedy_cosine_other"], torch.tensor([0.0, 0.0, 1.0]))


def test_round_trip_terms_reach_the_encoder_and_the_decoder_and_the_decoder_has_its_own_learning_rate():
    from tests.test_visual_latent import tiny

    torch.manual_seed(0)
    model, data = tiny(decoder_depth=1, decoder_dim=32, decoder_heads=2, decoder_ffn_dim=64, round_trip_weight=0.2,
                       copy_suppression_weight=0.1, best_of_k=3, copy_ngram=1, lr=1e-3, decoder_lr=1e-4)
    data.setup("fit")
    ids = data.host_tables("train")["views"][:8, 0]
    v = model.latent(ids)
    terms = model.round_trip_terms(ids, v, model.readout(v))
    assert 0.0 < terms["copied_share"] <= 1.0  # a random decoder's words also occur in the source (n = 1)
    assert torch.isfinite(terms["copy_suppression"]) and terms["copy_suppression"] > 0
    terms["cycle"].backward(retain_graph=True)
    for network in (model.encoder, model.readout, model.decoder):
        assert any(param.grad is not None and param.grad.abs().sum() > 0 for param in network.parameters())
    model.zero_grad()
    terms["copy_suppression"].backward()
    assert any(param.grad is not None and param.grad.abs().sum() > 0 for param in model.decoder.parameters())
    groups = model.parameter_groups()
    decoder_params = {id(param) for param in model.decoder.parameters()}
    in_groups = [id(param) for group in groups for param in group["params"]]
    assert sorted(in_groups) == sorted(id(param) for param in model.parameters() if param.requires_grad)
    for group in groups:  # the decoder's groups peak at decoder_lr, the others at the optimizer's lr
        assert {id(param) in decoder_params for param in group["params"]} == {"lr" in group}
        assert group.get("lr", 1e-4) == 1e-4


def test_cached_decoding_matches_the_full_forward_pass_at_every_step_with_copies_and_hidden_tokens():
    decoder = small_decoder(2, max_length=7, depth=2)
    v, z = torch.randn(3, 2, 4, 4), torch.randn(3, 3)
    hidden = torch.zeros(12, dtype=torch.bool)
    hidden[[5, 6]] = True
    greedy = decoder.generate(v, z, BOS_ID, EOS_ID, hidden=hidden)
    # copies: each latent's rows side by side, the same greedy decoding repeated
    assert torch.equal(decoder.generate(v, z, BOS_ID, EOS_ID, hidden=hidden, copies=2),
                       greedy.repeat_interleave(2, dim=0))
    assert not (greedy[:, 1:] == PAD_ID).all(dim=1).any() and not (greedy[:, 1:] == BOS_ID).any()
    # every token the cached path wrote is the argmax of the full pass over the prefix it had (hidden ones as BOS)
    prefix = greedy[:, :-1].masked_fill(greedy[:, :-1] == PAD_ID, EOS_ID)
    logits = decoder(torch.where(hidden[prefix], BOS_ID, prefix), v, z)
    logits[..., [PAD_ID, BOS_ID]] = float("-inf")
    live = written_before_eos(greedy)
    assert torch.equal(logits.argmax(dim=-1)[live], greedy[:, 1:][live])
