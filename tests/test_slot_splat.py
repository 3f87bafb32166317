"""The slot-attention variant of spec 004's latent head: the Gaussian splat by hand, masking, shapes."""

from __future__ import annotations

import math

import pytest
import torch

from modules.networks.grid_head import coordinate_grid
from modules.networks.slot_splat import (
    SlotAttention,
    SlotSplatHead,
    SummedHeads,
    TokenSplatHead,
    gaussian_splat,
    rename_pre_painter_weights,
)


def test_gaussian_splat_by_hand():
    coordinates = coordinate_grid(5)  # x and y in {-1, -0.5, 0, 0.5, 1}
    means = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]])
    scales = torch.tensor([[[0.5, 0.25], [0.5, 0.5]]])
    weights = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # slot 0 paints channel 0, slot 1 channel 1
    v = gaussian_splat(means, scales, torch.zeros(1, 2), weights, coordinates)
    assert v.shape == (1, 2, 5, 5)
    assert v[0, 0, 2, 2] == pytest.approx(1.0)  # the centre of slot 0
    assert v[0, 0, 2, 3] == pytest.approx(math.exp(-0.5 * (0.5 / 0.5) ** 2))  # half a unit right: along x
    assert v[0, 0, 3, 2] == pytest.approx(math.exp(-0.5 * (0.5 / 0.25) ** 2))  # half a unit down: along y
    assert v[0, 1, 0, 4] == pytest.approx(2.0)  # slot 1 sits at the top-right corner (x = 1, y = -1)
    # turned a quarter, slot 0's narrow axis lies along x
    turned = gaussian_splat(means, scales, torch.tensor([[math.pi / 2, 0.0]]), weights, coordinates)
    assert turned[0, 0, 2, 3] == pytest.approx(math.exp(-0.5 * (0.5 / 0.25) ** 2), rel=1e-5)
    assert turned[0, 0, 3, 2] == pytest.approx(math.exp(-0.5 * (0.5 / 0.5) ** 2), rel=1e-5)


def test_slot_attention_ignores_padding_and_is_deterministic():
    torch.manual_seed(0)
    attention = SlotAttention(dim=16, num_slots=4, iterations=3).eval()
    tokens = torch.randn(2, 7, 16)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    slots = attention(tokens, mask)
    assert slots.shape == (2, 4, 16)
    changed = tokens.clone()
    changed[1, 4:] = torch.randn(3, 16) * 10  # only padding changes
    torch.testing.assert_close(attention(changed, mask), slots)
    torch.testing.assert_close(attention(tokens, mask), slots)  # learned initial slots: no sampling
    assert not torch.allclose(attention(changed, torch.ones_like(mask)), slots)
    with pytest.raises(ValueError, match="num_slots and iterations must be positive"):
        SlotAttention(dim=16, num_slots=0)


def test_slot_splat_head_paints_blobs_inside_the_grid():
    torch.manual_seed(0)
    head = SlotSplatHead(dim=16, grid_size=24, channels=3, num_slots=2, iterations=2, min_scale=1.0, max_scale=1.5)
    v = head(torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool))
    assert v.shape == (3, 3, 24, 24) and bool(torch.isfinite(v).all())
    # two blobs of at most 1.5 px: most of the grid is near zero
    assert float((v.abs().amax(dim=1) < 1e-3 * v.abs().max()).float().mean()) > 0.3
    with pytest.raises(ValueError, match=r"tokens must have shape \[B, L, 16\]"):
        head(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="min_scale < max_scale"):
        SlotSplatHead(dim=16, grid_size=12, channels=3, min_scale=3.0, max_scale=2.0)


def test_summed_heads_add_their_latents_and_need_one_width():
    torch.manual_seed(0)
    first = SlotSplatHead(dim=16, grid_size=8, channels=2, num_slots=2)
    second = SlotSplatHead(dim=16, grid_size=8, channels=2, num_slots=3)
    tokens, mask = torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.bool)
    torch.testing.assert_close(SummedHeads(first, second)(tokens, mask), first(tokens, mask) + second(tokens, mask))
    with pytest.raises(ValueError, match="summed heads need one width"):
        SummedHeads(first, SlotSplatHead(dim=8, grid_size=8, channels=2))


def test_token_blobs_paint_one_gaussian_per_real_token_and_none_for_padding():
    torch.manual_seed(0)
    head = TokenSplatHead(dim=8, grid_size=9, channels=2, min_scale=1.0, max_scale=2.0)
    painter = head.painter
    with torch.no_grad():  # geometry: centre (tanh 0 = 0), scales at the sigmoid's midpoint (1.5 px), no turn
        painter.to_geometry.weight.zero_()
        painter.to_geometry.bias.zero_()
        painter.to_channels.weight.zero_()
        painter.to_channels.bias.copy_(torch.tensor([1.0, -2.0]))
    tokens, mask = torch.randn(2, 3, 8), torch.tensor([[True, True, True], [True, False, False]])
    v = head(tokens, mask)
    assert v.shape == (2, 2, 9, 9)
    # every real token paints weights (1, -2) at the centre: three tokens, then one
    torch.testing.assert_close(v[:, :, 4, 4], torch.tensor([[3.0, -6.0], [1.0, -2.0]]))
    pixel = 2.0 / 8
    one_pixel_away = torch.exp(torch.tensor(-0.5 * (pixel / (1.5 * pixel)) ** 2))
    torch.testing.assert_close(v[1, 0, 4, 5], one_pixel_away)
    changed = tokens.clone()
    changed[1, 1:] = torch.randn(2, 8) * 10  # only padding changes
    torch.testing.assert_close(head(changed, mask)[1], v[1])
    with pytest.raises(ValueError, match=r"tokens must have shape \[B, L, 8\]"):
        head(torch.randn(2, 3, 4), mask)
    with pytest.raises(ValueError, match="mask has a row with no real token"):
        head(tokens, torch.zeros(2, 3, dtype=torch.bool))


def test_a_slot_head_saved_before_the_painter_still_loads():
    torch.manual_seed(0)
    head = SlotSplatHead(dim=8, grid_size=6, channels=2, num_slots=2)
    saved = {key.replace("painter.norm.", "slot_norm.").replace("painter.", ""): value
             for key, value in head.state_dict().items()}
    assert "slot_norm.weight" in saved and "to_geometry.bias" in saved
    restored = SlotSplatHead(dim=8, grid_size=6, channels=2, num_slots=2)
    rename_pre_painter_weights(saved, "")
    restored.load_state_dict(saved)
    tokens, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    torch.testing.assert_close(restored(tokens, mask), head(tokens, mask))
