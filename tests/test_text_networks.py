"""Spec 004's text encoder (token Transformer + grid cross-attention head) and the readout g(V)."""

from __future__ import annotations

import math

import pytest
import torch

from modules.networks.grid_head import GridCrossAttentionHead, LocalSmoothing, TextToGrid, coordinate_grid
from modules.networks.readout import AttentionReadout, MeanVarReadout, pooled_mean_variance, standardized_maps
from modules.networks.text_encoder import TextTransformer, apply_rotary, rotary_tables
from tests.conftest import mean_cosine_between_rows

VOCAB = 50
DIM = 32


def tiny_encoder(positions: str = "rope") -> TextTransformer:
    return TextTransformer(VOCAB, max_length=16, dim=DIM, depth=2, heads=4, ffn_dim=64, positions=positions)


def tiny_head(**options) -> GridCrossAttentionHead:
    return GridCrossAttentionHead(dim=DIM, grid_size=8, query_channels=4, channels=3, heads=4, ffn_dim=48,
                                  **options)


def tiny_text_to_grid(**head_options) -> TextToGrid:
    return TextToGrid(tiny_encoder(), tiny_head(**head_options))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sentences(batch: int = 3, length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-pad ids and a mask whose rows have different numbers of real tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    lengths = torch.tensor([length - 2 * (row % 2) for row in range(batch)])
    mask = torch.arange(length) < lengths[:, None]
    return ids.masked_fill(~mask, 0), mask


def with_padding(ids: torch.Tensor, mask: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sentences with ``extra`` pad tokens appended; the pad ids are arbitrary on purpose."""
    pad_ids = torch.randint(0, VOCAB, (ids.shape[0], extra), generator=torch.Generator().manual_seed(9))
    return torch.cat([ids, pad_ids], dim=1), torch.cat([mask, mask.new_zeros(ids.shape[0], extra)], dim=1)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_encoder_gives_one_state_per_token(positions):
    ids, mask = sentences()
    assert tiny_encoder(positions)(ids, mask).shape == (3, 7, DIM)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_appended_padding_does_not_change_real_token_states(positions):
    torch.manual_seed(0)
    encoder = tiny_encoder(positions).eval()
    ids, mask = sentences()
    states = encoder(ids, mask)
    padded_states = encoder(*with_padding(ids, mask, extra=5))
    assert torch.allclose(padded_states[:, :7][mask], states[mask], atol=1e-5)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_encoder_uses_token_order(positions):
    # Without a positional signal self-attention is permutation-equivariant: reversing the input would
    # just reverse the states.
    torch.manual_seed(1)
    encoder = tiny_encoder(positions).eval()
    ids = torch.randint(1, VOCAB, (1, 6))
    mask = torch.ones(1, 6, dtype=torch.bool)
    reversed_back = encoder(ids.flip(1), mask).flip(1)
    assert not torch.allclose(reversed_back, encoder(ids, mask), atol=1e-3)


def mean_cosine_between_token_states(positions: str, seed: int, **options) -> float:
    """Mean cosine between the initial states of random tokens, for the CPU profile's encoder (2 x 128)."""
    torch.manual_seed(seed)
    encoder = TextTransformer(200, 16, 128, depth=2, heads=4, ffn_dim=512, dropout=0.0, positions=positions,
                              **options).eval()
    ids = torch.randint(1, 200, (16, 12))
    with torch.no_grad():
        states = encoder(ids, torch.ones_like(ids, dtype=torch.bool)).flatten(0, 1)
    return mean_cosine_between_rows(states)


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("seed", [0, 1])
def test_token_states_start_apart_by_default(positions, seed):
    # At BERT's 0.02 the blocks' outputs swamp the tokens and the states start alike (measured 0.61 to 0.70 with
    # learned positions, 0.33 to 0.44 with rotary ones); at the default unit scale they start apart (about 0.02).
    assert mean_cosine_between_token_states(positions, seed, token_embedding_std=0.02) > 0.3
    assert mean_cosine_between_token_states(positions, seed) < 0.1


def test_token_embedding_std_reaches_the_table():
    for std in (0.02, 1.0):
        encoder = TextTransformer(VOCAB, max_length=16, dim=DIM, depth=1, heads=4, ffn_dim=64,
                                  token_embedding_std=std)
        assert torch.all(encoder.token_embedding.weight[0] == 0)  # the pad row stays zero
        assert 0.8 * std < float(encoder.token_embedding.weight[1:].std()) < 1.2 * std


def test_rotary_tables_by_hand():
    cos, sin = rotary_tables(length=3, head_dim=4, base=100.0)
    # Frequencies 100^0 = 1 and 100^(-2/4) = 0.1; angles are position * frequency.
    angles = torch.tensor([[0.0, 0.0], [1.0, 0.1], [2.0, 0.2]])
    assert torch.allclose(cos, angles.cos()) and torch.allclose(sin, angles.sin())


def test_rotary_turns_each_feature_pair_by_its_angle():
    cos, sin = rotary_tables(length=3, head_dim=2, base=100.0)  # one pair, frequency 1
    rotated = apply_rotary(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]]), cos, sin)
    expected = torch.tensor([[1.0, 0.0], [math.cos(1), math.sin(1)], [-2 * math.sin(2), 2 * math.cos(2)]])
    assert torch.allclose(rotated, expected, atol=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(2)
    cos, sin = rotary_tables(length=40, head_dim=8)
    q, k = torch.randn(8), torch.randn(8)
    rotated_q = apply_rotary(q.expand(40, 8), cos, sin)
    rotated_k = apply_rotary(k.expand(40, 8), cos, sin)
    scores = rotated_q @ rotated_k.T  # scores[m, n] = <R_m q, R_n k>
    for shift in (1, 9, 25):
        assert torch.allclose(scores[3 + shift, 7 + shift], scores[3, 7], atol=1e-4)
        assert torch.allclose(scores[12 + shift, 2 + shift], scores[12, 2], atol=1e-4)
    assert not torch.allclose(scores[3, 8], scores[3, 7], atol=1e-2)


def test_rotary_needs_an_even_head_dim():
    with pytest.raises(ValueError, match="even head_dim"):
        rotary_tables(length=4, head_dim=5)


def test_too_long_input_is_rejected():
    ids = torch.ones(2, 17, dtype=torch.long)
    with pytest.raises(ValueError, match="length 17, more than max_length=16"):
        tiny_encoder()(ids, torch.ones(2, 17, dtype=torch.bool))


@pytest.mark.parametrize(("mask", "message"), [
    (torch.ones(2, 5, dtype=torch.long), "bool"),
    (torch.ones(2, 4, dtype=torch.bool), r"\[B, L\] = \(2, 5\)"),
    (torch.tensor([[True] * 5, [False] * 5]), "no real token"),
])
def test_bad_masks_are_rejected(mask, message):
    with pytest.raises(ValueError, match=message):
        tiny_encoder()(torch.ones(2, 5, dtype=torch.long), mask)


def test_grid_head_paints_a_channels_first_grid():
    ids, mask = sentences(batch=2)
    v = tiny_text_to_grid()(ids, mask)
    assert v.shape == (2, 3, 8, 8)


def test_grid_is_unchanged_by_appended_padding():
    torch.manual_seed(3)
    model = tiny_text_to_grid().eval()
    ids, mask = sentences()
    assert torch.allclose(model(*with_padding(ids, mask, extra=4)), model(ids, mask), atol=1e-5)


def test_grid_depends_on_the_text_and_only_on_it():
    torch.manual_seed(4)
    model = tiny_text_to_grid().eval()
    ids, mask = sentences(batch=2)
    ids[1] = ids[0].roll(1)
    mask[1] = True
    ids, mask = torch.cat([ids, ids[:1]]), torch.cat([mask, mask[:1]])  # row 2 repeats row 0
    v = model(ids, mask)
    assert (v[0] - v[1]).abs().max() > 1e-3
    assert torch.allclose(v[2], v[0], atol=1e-6)


def test_grid_queries_are_distinct_per_cell():
    queries = tiny_head().grid_queries()
    assert queries.shape == (64, DIM)
    assert torch.cdist(queries, queries).add(torch.eye(64)).min() > 1e-3


def test_head_rejects_states_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"\[B, L, 32\]"):
        tiny_head()(torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool))


def test_a_narrower_head_reads_projected_token_states():
    model = TextToGrid(tiny_encoder(), GridCrossAttentionHead(dim=16, grid_size=4, heads=2, ffn_dim=8))
    assert (model.token_projection.in_features, model.token_projection.out_features) == (32, 16)
    assert model(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool)).shape == (1, 6, 4, 4)
    assert isinstance(tiny_text_to_grid().token_projection, torch.nn.Identity)


def test_coordinate_grid_by_hand():
    x, y = coordinate_grid(3)
    assert torch.equal(x, torch.tensor([[-1.0, 0.0, 1.0]] * 3))
    assert torch.equal(y, x.T)


def test_options_add_exactly_their_parameters():
    base = count_parameters(tiny_head())
    # Two more input channels of the 3x3 query conv to DIM outputs.
    assert count_parameters(tiny_head(coordinate_channels=True)) - base == 2 * DIM * 3 * 3
    # Depthwise 3x3 (weights + bias) and 1x1 channel mix (weights + bias) on 3 channels.
    assert count_parameters(tiny_head(smoothing=True)) - base == (3 * 9 + 3) + (3 * 3 + 3)
    ids, mask = sentences(batch=2)
    for options in ({"coordinate_channels": True}, {"smoothing": True}):
        assert tiny_text_to_grid(**options)(ids, mask).shape == (2, 3, 8, 8)


def test_coordinate_channels_change_the_queries():
    torch.manual_seed(5)
    head = tiny_head(coordinate_channels=True)
    with torch.no_grad():
        head.query_map.zero_()  # what is left of the queries comes from the coordinates
    queries = head.grid_queries()
    assert torch.cdist(queries, queries).add(torch.eye(64)).min() > 1e-4


def test_smoothing_starts_as_identity_and_learns():
    smoothing = LocalSmoothing(channels=3)
    v = torch.randn(2, 3, 5, 5)
    assert torch.equal(smoothing(v), v)
    smoothing(v).square().sum().backward()
    assert smoothing.mix.weight.grad.abs().sum() > 0


def test_spec_default_model_has_about_20m_parameters():
    encoder = TextTransformer(vocab_size=16_000)
    model = TextToGrid(encoder, GridCrossAttentionHead())
    # Measured 19.60M (16.79M encoder, of which 6.14M embeddings; 2.81M head); the spec says ~20-25M.
    assert 19_500_000 < count_parameters(model) < 19_700_000
    assert 2_700_000 < count_parameters(model.head) < 2_900_000


def test_gradients_reach_the_token_embedding_and_the_query_map():
    torch.manual_seed(6)
    model = tiny_text_to_grid()
    ids, mask = sentences()
    model(ids, mask).square().mean().backward()
    embedding_grad = model.encoder.token_embedding.weight.grad
    assert embedding_grad[ids[mask]].abs().sum(dim=1).min() > 0
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[ids[mask]] = False
    assert torch.all(embedding_grad[unused] == 0)  # includes the pad id, which is masked everywhere
    assert model.head.query_map.grad.abs().sum() > 0


def test_pooled_mean_variance_by_hand():
    v = torch.tensor([[1.0, 2.0, 0.0, 0.0],
                      [3.0, 6.0, 0.0, 4.0],
                      [5.0, 5.0, 1.0, 1.0],
                      [5.0, 5.0, 1.0, 1.0]]).reshape(1, 1, 4, 4)
    features = pooled_mean_variance(v, pool_levels=(1, 2))
    # Level 1: mean 40/16 = 2.5, E[v^2] = (50 + 16 + 100 + 4)/16 = 10.625, variance 4.375.
    # Level 2 cells (row-major): values {1,2,3,6}, {0,0,0,4}, {5,5,5,5}, {1,1,1,1}.
    expected = torch.tensor([2.5, 4.375, 3.0, 1.0, 5.0, 1.0, 3.5, 3.0, 0.0, 0.0])
    assert torch.allclose(features, expected[None])


def test_pooled_features_are_ordered_channel_major():
    v = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 7.0)])[None]  # two constant channels
    assert torch.allclose(pooled_mean_variance(v, pool_levels=(1,)), torch.tensor([[1.0, 7.0, 0.0, 0.0]]))


@pytest.mark.parametrize(("pool_levels", "feature_count"), [((1,), 2 * 6), ((1, 2, 4), 2 * 6 * (1 + 4 + 16))])
def test_readout_feature_count(pool_levels, feature_count):
    readout = MeanVarReadout(channels=6, out_dim=16, hidden_dim=24, pool_levels=pool_levels)
    assert readout.mlp[0].in_features == feature_count
    assert readout(torch.randn(5, 6, 8, 8)).shape == (5, 16)


def test_readout_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, 6, H, W\]"):
        MeanVarReadout(channels=6)(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="pool level 16"):
        MeanVarReadout(channels=6, pool_levels=(1, 16))(torch.randn(2, 6, 8, 8))
    with pytest.raises(ValueError, match="pool_levels must be a list of positive ints"):
        MeanVarReadout(channels=6, pool_levels=(0,))
    with pytest.raises(ValueError, match="pool_levels must be a non-empty list"):
        MeanVarReadout(channels=6, pool_levels=())


def test_standardized_readout_reads_the_layout_only():
    torch.manual_seed(0)
    readout = MeanVarReadout(channels=3, out_dim=8, hidden_dim=16, pool_levels=(1, 2), standardize_maps=True)
    v = torch.randn(2, 3, 8, 8)
    # each map's brightness and contrast changed: the same z
    brightened = v * torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1) + torch.tensor([1.0, -4.0, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(readout(brightened), readout(v), atol=1e-4, rtol=1e-4)
    # the same values elsewhere: another z
    assert not torch.allclose(readout(v.flip(-1)), readout(v), atol=1e-3)
    standardized = standardized_maps(v)
    torch.testing.assert_close(standardized.mean(dim=(-2, -1)), torch.zeros(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(standardized.var(dim=(-2, -1), correction=0), torch.ones(2, 3), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="standardize_maps leaves nothing for pool level 1"):
        MeanVarReadout(channels=3, pool_levels=(1,), standardize_maps=True)


def test_attention_readout_ignores_brightness_and_rejects_bad_input():
    torch.manual_seed(0)
    readout = AttentionReadout(channels=3, grid_size=8, out_dim=8, hidden_dim=16, pool_levels=(1, 2),
                               standardize_maps=True, queries=2, dim=16)
    assert readout.mlp[0].in_features == 2 * 16 + 2 * 3 * (1 + 4)  # the queries' states, then the statistics
    v = torch.randn(2, 3, 8, 8)
    brightened = v * torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1) + torch.tensor([1.0, -4.0, 0.3]).view(1, 3, 1, 1)
    assert readout(v).shape == (2, 8)
    torch.testing.assert_close(readout(brightened), readout(v), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\], got \(2, 3, 16, 16\)"):
        readout(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="pool level 16 has more cells"):
        AttentionReadout(channels=3, grid_size=8, pool_levels=(16,))
    with pytest.raises(ValueError, match="standardize_maps leaves nothing for pool level 1"):
        AttentionReadout(channels=3, grid_size=8, pool_levels=(1,), standardize_maps=True)


def one_dot_maps(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[count, 1, 4, 4]`` maps, each zero but for one pixel at 1, and whether that pixel lies in the left half."""
    places = torch.randint(0, 16, (count,), generator=generator)
    maps = torch.zeros(count, 16).scatter_(1, places[:, None], 1.0).view(count, 1, 4, 4)
    return maps, (places % 4 < 2).float()


def test_attention_readout_learns_where_a_dot_lies():
    """A single dot's half of the map: every map has the same whole-map mean and variance, which therefore say
    nothing about it, while the queries' attention over placed pixels learns it."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    readout = AttentionReadout(channels=1, grid_size=4, out_dim=1, hidden_dim=32, queries=4, dim=16)
    optimizer = torch.optim.Adam(readout.parameters(), lr=1e-2)
    for _ in range(200):
        maps, left = one_dot_maps(64, generator)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(readout(maps).squeeze(1), left)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    maps, left = one_dot_maps(256, generator)
    with torch.no_grad():
        accuracy = ((readout(maps).squeeze(1) > 0).float() == left).float().mean().item()
    assert accuracy > 0.95
