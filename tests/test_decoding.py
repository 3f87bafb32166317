"""Spec 004 P4's decoder and its objective: teacher forcing against hand-computed cross-entropies, the
vocabulary mask, the shuffle ablation, attention concentration, and the decoder's causality and memory."""

from __future__ import annotations

import math

import pytest
import torch

from modules.latent_decoding import decoder_logits, decoding_rows, summarize
from modules.losses.decoding import (
    attention_concentration,
    masked_logits,
    reconstruction_loss,
    shuffle_pixels,
    teacher_forcing,
    vocabulary_mask,
)
from modules.networks.text_decoder import LatentMemory, LatentTextDecoder, hide_tokens
from modules.visual_latent import content_kind_table
from tests.conftest import mean_cosine_between_rows
from text.blocks.sentences import CONTENT_KINDS, FUNCTION_TOKEN, NO_SINGLE_KIND
from text.tokenizer import BOS_ID, EOS_ID, PAD_ID


def small_decoder(seed: int, max_length: int = 6, depth: int = 1, dropout: float = 0.0) -> LatentTextDecoder:
    """A decoder over 12 tokens reading a 2 x 4 x 4 latent, in eval mode unless it has dropout."""
    torch.manual_seed(seed)
    decoder = LatentTextDecoder(vocab_size=12, max_length=max_length, channels=2, grid_size=4, embedding_dim=3,
                                dim=16, depth=depth, heads=2, ffn_dim=32, dropout=dropout)
    return decoder if dropout else decoder.eval()


def written_before_eos(ids: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, L - 1]``: the positions of ``ids[:, 1:]`` up to and including each row's first EOS."""
    live = torch.ones_like(ids[:, 1:], dtype=torch.bool)
    for row, tokens in enumerate(ids[:, 1:].tolist()):
        if EOS_ID in tokens:
            live[row, tokens.index(EOS_ID) + 1:] = False
    return live


def test_teacher_forced_loss_by_hand():
    framed = torch.tensor([[BOS_ID, 5, EOS_ID, PAD_ID]])
    inputs, targets = teacher_forcing(framed)
    assert inputs.tolist() == [[BOS_ID, 5, EOS_ID]] and targets.tolist() == [[5, EOS_ID, PAD_ID]]
    logits = torch.zeros(1, 3, 6)
    logits[0, 0, 5] = math.log(3.0)  # p(5) = 3 / (3 + 5) after BOS
    logits[0, 1, EOS_ID] = 10.0  # the padding target's logits are ignored, whatever they are
    logits[0, 2] = torch.arange(6.0)
    expected = (-math.log(3 / 8) + -math.log(math.exp(10) / (math.exp(10) + 5))) / 2
    assert reconstruction_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="start every row with BOS"):
        teacher_forcing(torch.tensor([[5, EOS_ID]]))


def test_no_masked_token_can_be_produced():
    corpus = torch.tensor([[BOS_ID, 4, 7, EOS_ID, PAD_ID], [BOS_ID, 7, 9, 9, EOS_ID]])
    allowed = vocabulary_mask(corpus, 12)
    assert allowed.nonzero().flatten().tolist() == [EOS_ID, 4, 7, 9]
    logits = masked_logits(torch.randn(64, 5, 12, generator=torch.Generator().manual_seed(0)) * 5, allowed)
    assert allowed[logits.argmax(dim=-1)].all()
    probabilities = logits.softmax(dim=-1)
    assert probabilities[..., ~allowed].sum() == 0
    samples = torch.multinomial(probabilities.flatten(0, 1), 200, replacement=True)
    assert allowed[samples].all()


def test_shuffle_keeps_every_map_s_values_and_moves_its_layout():
    v = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    shuffled = shuffle_pixels(v, torch.Generator().manual_seed(2))
    assert torch.equal(shuffled.flatten(2).sort(dim=-1).values, v.flatten(2).sort(dim=-1).values)
    torch.testing.assert_close(shuffled.mean(dim=(2, 3)), v.mean(dim=(2, 3)))
    assert (shuffled != v).float().mean() > 0.9
    # each map has its own permutation: two identical channels end up different
    twins = v[:, :1].expand(3, 2, 8, 8).contiguous()
    assert not torch.equal(*shuffle_pixels(twins, torch.Generator().manual_seed(3)).unbind(1))


def test_attention_concentration_by_hand():
    rows = torch.zeros(3, 16)
    rows[0] = 1 / 16  # uniform
    rows[1, 3] = 1.0  # one position
    rows[2, :2] = 0.5  # two positions
    found = attention_concentration(rows)
    torch.testing.assert_close(found["entropy"], torch.tensor([1.0, 0.0, math.log(2) / math.log(16)]))
    torch.testing.assert_close(found["peak"], torch.tensor([1.0, 16.0, 8.0]))


def test_decoder_is_causal_reads_the_layout_and_reports_its_attention():
    torch.manual_seed(0)
    decoder = LatentTextDecoder(vocab_size=20, max_length=8, channels=3, grid_size=4, embedding_dim=5, dim=16,
                                depth=2, heads=2, ffn_dim=32, dropout=0.0).eval()
    ids = torch.tensor([[BOS_ID, 4, 5, 6], [BOS_ID, 7, EOS_ID, PAD_ID]])
    v, z = torch.randn(2, 3, 4, 4), torch.randn(2, 5)
    logits = decoder(ids, v, z)
    assert logits.shape == (2, 4, 20)
    changed = ids.clone()
    changed[0, 3] = 9  # a later token cannot change earlier predictions
    torch.testing.assert_close(decoder(changed, v, z)[0, :3], logits[0, :3])
    assert not torch.allclose(decoder(ids, shuffle_pixels(v), z), logits)  # the pixels' places matter
    weights = decoder.cross_attention(ids, v, z)
    assert weights.shape == (2, 2, 4, 1 + 16)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 2, 4))
    with pytest.raises(ValueError, match=r"v must have shape \[B, C, 4, 4\]"):
        decoder(ids, torch.randn(2, 3, 5, 5), z)


def test_patch_memory_reads_each_patch_as_one_token_and_spreads_its_attention_over_the_patch():
    memory = LatentMemory(channels=2, grid_size=4, embedding_dim=3, dim=8, patch_size=2)
    v = torch.zeros(1, 2, 4, 4)
    v[0, 1, 3, 0] = 1.0  # a pixel of patch (row 1, column 0), row-major patch 2
    with torch.no_grad():
        memory.pixel.weight.zero_()
        memory.pixel.bias.zero_()
        memory.pixel.weight[0, 2 * (1 * 2 + 0) + 1] = 1.0  # feature 0 reads channel 1 of the patch's pixel (1, 0)
        memory.rows.zero_()
        memory.columns.zero_()
    tokens = memory(v, torch.zeros(1, 3))
    assert tokens.shape == (1, 1 + 4, 8)
    torch.testing.assert_close(tokens[0, 1:, 0], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    on_patches = torch.tensor([[0.0, 0.6, 0.4, 0.0]])  # patch (0, 1) and patch (1, 0)
    pixels = memory.over_pixels(on_patches).view(4, 4)
    expected = torch.zeros(4, 4)
    expected[:2, 2:] = 0.15
    expected[2:, :2] = 0.1
    torch.testing.assert_close(pixels, expected)
    # one patch holds all the weight: spread over its 4 of 16 pixels, entropy log 4 / log 16 in pixel units
    one_patch = attention_concentration(memory.over_pixels(torch.tensor([0.0, 1.0, 0.0, 0.0])))
    torch.testing.assert_close(one_patch["entropy"], torch.tensor(0.5))
    with pytest.raises(ValueError, match="patch_size must be a positive divisor of grid_size 4, got 3"):
        LatentMemory(channels=2, grid_size=4, embedding_dim=3, dim=8, patch_size=3)


def test_a_decoder_on_standardized_maps_reads_the_layout_only():
    torch.manual_seed(0)
    decoder = LatentTextDecoder(vocab_size=20, max_length=8, channels=3, grid_size=4, embedding_dim=5, dim=16,
                                depth=1, heads=2, ffn_dim=32, dropout=0.0, standardize_maps=True).eval()
    ids, v, z = torch.tensor([[BOS_ID, 4, 5]]), torch.randn(1, 3, 4, 4), torch.randn(1, 5)
    brighter = v * torch.tensor([3.0, 0.5, 2.0]).view(1, 3, 1, 1) + torch.tensor([1.0, 2.0, -5.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(decoder(ids, brighter, z), decoder(ids, v, z), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(decoder(ids, v.flip(-1), z), decoder(ids, v, z), atol=1e-3)


def test_hidden_tokens_reach_the_decoder_as_bos_so_it_cannot_copy_them():
    hidden = torch.zeros(12, dtype=torch.bool)
    hidden[[4, 7]] = True
    ids = torch.tensor([[BOS_ID, 4, 5, 7, EOS_ID], [BOS_ID, 6, 7, 4, PAD_ID]])
    assert hide_tokens(ids, hidden, BOS_ID).tolist() == [[BOS_ID, BOS_ID, 5, BOS_ID, EOS_ID],
                                                         [BOS_ID, 6, BOS_ID, BOS_ID, PAD_ID]]
    assert hide_tokens(ids, None, BOS_ID) is ids
    decoder = small_decoder(3)
    v, z = torch.randn(2, 2, 4, 4), torch.randn(2, 3)
    # which hidden token stood in the prefix changes nothing downstream; a shown one does
    framed = torch.tensor([[BOS_ID, 4, 5, 6, EOS_ID]] * 2)
    other = framed.clone()
    other[:, 1] = 7
    hidden_logits = decoder_logits(decoder, framed, v, z, None, hidden)[0]
    torch.testing.assert_close(decoder_logits(decoder, other, v, z, None, hidden)[0], hidden_logits)
    shown_logits = decoder_logits(decoder, framed, v, z, None)[0]
    assert not torch.allclose(decoder_logits(decoder, other, v, z, None)[0], shown_logits)
    # greedy decoding feeds the hidden tokens it writes back as BOS: allowed only hidden ones (and no EOS, so
    # every row runs to max_length), it decodes as if its whole prefix were BOS
    allowed = hidden.clone()
    ids = decoder.generate(v, z, BOS_ID, EOS_ID, allowed, hidden)
    assert ids.shape == (2, 6) and hidden[ids[:, 1:]].all()
    logits = masked_logits(decoder(torch.full_like(ids[:, :-1], BOS_ID), v, z), allowed)
    assert torch.equal(logits.argmax(dim=-1), ids[:, 1:])
    shown = masked_logits(decoder(ids[:, :-1], v, z), allowed)  # what it would write seeing its own tokens
    assert not torch.allclose(shown, logits)


def decoder_at_start(seed: int, **scales) -> LatentTextDecoder:
    torch.manual_seed(seed)
    return LatentTextDecoder(vocab_size=64, max_length=16, channels=6, grid_size=16, embedding_dim=8, dim=64,
                             depth=2, heads=4, ffn_dim=128, dropout=0.0, standardize_maps=True, **scales).eval()


def start_similarities(decoder: LatentTextDecoder) -> tuple[float, float]:
    """The mean cosine between the last block's states of a sentence's different tokens, and the share of the
    pixels' key variance (over pixels and latents, after the memory's LayerNorm) that their places explain."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 64, (8, 10), generator=generator)
    ids[:, 0] = BOS_ID
    v, z = torch.randn(8, 6, 16, 16, generator=generator), torch.randn(8, 8, generator=generator)
    with torch.no_grad():
        states, mask, memory = decoder._states(ids, v, z)
        for block in decoder.blocks:
            states = block(states, mask, memory)
        keys = decoder.blocks[-1].cross.token_norm(memory[:, 1:])
        centred = keys - keys.mean(dim=(0, 1))
        place_share = centred.mean(dim=0).square().sum() * len(keys) / centred.square().sum()
    return mean_cosine_between_rows(states), float(place_share)


@pytest.mark.parametrize("seed", [0, 1])
def test_decoder_states_start_alike_at_the_default_and_apart_at_unit_scale(seed):
    # At BERT's 0.02 the blocks' branches swamp the embeddings: the states start alike (mean cosine 0.83 and 0.89
    # here) and a pixel's key is mostly its values (its place explains 0.13 of the key variance); at unit scale
    # the states start apart (0.08) and the place explains 0.83 to 0.84.
    alike, blind = start_similarities(decoder_at_start(seed))
    apart, placed = start_similarities(decoder_at_start(seed, token_embedding_std=1.0, memory_position_std=1.0))
    assert alike > 0.5 and apart < 0.2
    assert blind < 0.3 and placed > 0.6


def test_decoder_start_scales_reach_the_tables():
    for std in (0.02, 1.0):
        decoder = decoder_at_start(0, token_embedding_std=std, memory_position_std=std)
        assert torch.all(decoder.token_embedding.weight[PAD_ID] == 0)
        assert 0.8 * std < float(decoder.token_embedding.weight[PAD_ID + 1:].detach().std()) < 1.2 * std
        for table in (decoder.memory.rows, decoder.memory.columns):
            assert 0.7 * std < float(table.detach().std()) < 1.2 * std  # truncated at two standard deviations


def test_content_tokens_are_the_color_shape_count_and_relation_words():
    from text.blocks import training_examples
    from text.blocks.sentences import content_words
    from text.tokenizer import content_token_table, train_bpe

    sentences = [s for item in training_examples(60, 0, 2, 1) for s in item["views"]]
    tokenizer = train_bpe(sentences, vocab_size=400)
    table = content_token_table(tokenizer, sentences, content_words())
    words = {tokenizer.id_to_token(i).lstrip("Ġ"): bool(table[i]) for i in range(tokenizer.get_vocab_size())}
    assert words["red"] and words["cube"] and words["two"] and words["left"]
    assert not words["the"] and not words["of"] and not words[","]
    assert not table[[PAD_ID, BOS_ID, EOS_ID]].any()
    kinds = content_kind_table(tokenizer, sentences)
    kind_of = {word: int(kinds[tokenizer.token_to_id(f"Ġ{word}")])
               for word in ("red", "cube", "two", "left", "blocks", "the")}
    assert [kind_of[word] for word in ("red", "cube", "two", "left")] == [CONTENT_KINDS.index(kind) for kind in
                                                                          ("color", "shape", "count", "relation")]
    assert kind_of["blocks"] == NO_SINGLE_KIND  # a shape ("two red blocks") and a verb ("a cube blocks a ball")
    assert kind_of["the"] == FUNCTION_TOKEN and kinds[tokenizer.token_to_id(",")] == FUNCTION_TOKEN
    assert torch.equal(kinds != FUNCTION_TOKEN, table)


def test_greedy_generation_follows_the_argmax_stops_at_eos_and_keeps_to_the_vocabulary():
    decoder = small_decoder(0)
    v, z = torch.randn(5, 2, 4, 4), torch.randn(5, 3)
    allowed = torch.zeros(12, dtype=torch.bool)
    allowed[[EOS_ID, 4, 5, 6]] = True
    ids = decoder.generate(v, z, BOS_ID, EOS_ID, allowed)
    assert ids.shape[1] <= 6 and (ids[:, 0] == BOS_ID).all()
    for row in ids.tolist():
        written = row[1:]
        if EOS_ID in written:  # nothing but padding after the end
            assert all(token == PAD_ID for token in written[written.index(EOS_ID) + 1:])
            written = written[: written.index(EOS_ID) + 1]
        assert all(allowed[token] for token in written)
    # each written token is the masked argmax given the prefix
    prefix = ids[:, :-1].clone()
    prefix[prefix == PAD_ID] = EOS_ID  # positions after the end are not checked below
    logits = masked_logits(decoder(prefix, v, z), allowed)
    live = written_before_eos(ids)
    assert torch.equal(logits.argmax(dim=-1)[live], ids[:, 1:][live])


class FixedDecoder(torch.nn.Module):
    """Writes the same chosen tokens whatever it reads, and attends evenly: a hand-made case for the scores."""

    def __init__(self, predicted: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.logits = torch.nn.functional.one_hot(predicted, vocab_size).float() * 10
        self.memory = LatentMemory(channels=2, grid_size=3, embedding_dim=4, dim=8)  # reads each pixel

    def forward(self, ids, v, z):
        return self.logits[:, : ids.shape[1]]

    def cross_attention(self, ids, v, z):
        size = 1 + v.shape[2] * v.shape[3]
        return torch.full((len(ids), 1, ids.shape[1], size), 1.0 / size)


def test_decoding_scores_by_hand():
    # the sentence "3 4 5": targets 3 4 5 EOS; tokens 3 and 5 are content, 4 is a function token
    ids = torch.tensor([[3, 4, 5]])
    predicted = torch.tensor([[6, 4, 7, EOS_ID]])  # writes 6 for 3 (a synonym the meaning allows), 7 for 5
    accepted = torch.tensor([[[3, 6], [4, -1], [5, -1], [EOS_ID, -1]]])
    best = torch.tensor([[6, 4, 5, EOS_ID]])  # most realizations say 6 where this one says 3
    kinds = torch.full((8,), FUNCTION_TOKEN)
    kinds[[3, 6]] = CONTENT_KINDS.index("color")
    kinds[[5, 7]] = CONTENT_KINDS.index("shape")
    v = torch.randn(1, 2, 3, 3)
    rows = decoding_rows(FixedDecoder(predicted, 8), lambda latent: torch.zeros(1, 4), ids, v, torch.zeros(1, 4),
                         None, kinds, accepted, best)
    scores = summarize(rows)
    assert rows["content_tokens"].item() == 2 and rows["function_tokens"].item() == 2  # 4 and EOS
    assert scores["content_accuracy"].item() == pytest.approx(0.5)  # 6 is allowed for 3, 7 is not 5
    assert scores["content_accuracy_color"].item() == 1.0 and scores["content_accuracy_shape"].item() == 0.0
    assert math.isnan(scores["content_accuracy_count"].item())  # the sentence states no count
    assert scores["content_exact_accuracy"].item() == 0.0
    assert scores["content_exact_ceiling"].item() == pytest.approx(0.5)  # best is right at 5, wrong at 3
    assert scores["function_accuracy"].item() == 1.0
    assert scores["shuffle_ce_increase"].item() == pytest.approx(0.0)  # it never reads the latent
    assert scores["content_accuracy_shuffled"].item() == pytest.approx(0.5)
    assert math.isnan(scores["content_accuracy_wrong_latent"].item())  # a batch of one has no other latent
    pair = decoding_rows(FixedDecoder(predicted.expand(2, -1), 8), lambda latent: torch.zeros(2, 4),
                         ids.expand(2, -1), torch.randn(2, 2, 3, 3), torch.zeros(2, 4), None, kinds,
                         accepted.expand(2, -1, -1), best.expand(2, -1))
    assert summarize(pair)["content_accuracy_wrong_latent"].item() == pytest.approx(0.5)  # as from its own
    assert scores["content_attention_entropy"].item() == pytest.approx(1.0)  # spread evenly
