"""Spec 004 P3's latent jitter: shifts move content by whole pixels, cutout zeroes its square, the random
jitter is what its parameters say, and the robustness curve reads a readout's cosine per shift."""

from __future__ import annotations

import pytest
import torch

from modules.latent_jitter import cutout, jitter, shift, shift_robustness
from modules.networks.readout import MeanVarReadout


def test_a_two_pixel_shift_moves_content_by_two_pixels_and_repeats_the_border():
    v = torch.zeros(2, 1, 8, 8)
    v[:, 0, 3, 4] = 1.0
    moved = shift(v, torch.tensor([2, -1]), torch.tensor([0, 2]))
    assert moved[0, 0].nonzero().tolist() == [[3, 6]]  # 2 px right
    assert moved[1, 0].nonzero().tolist() == [[5, 3]]  # 1 px left, 2 px down
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 2, 8, 8)
    right = shift(ramp, torch.tensor([2]), torch.tensor([0]))
    assert right[0, 1, 5].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]  # the left border repeats into the strip
    assert torch.equal(shift(ramp, torch.tensor([0]), torch.tensor([0])), ramp)


def test_cutout_zeroes_exactly_the_stated_square_in_every_channel():
    v = torch.ones(2, 3, 8, 8)
    out = cutout(v, torch.tensor([1, 4]), torch.tensor([2, 0]), size=3)
    assert (out == 0).sum().item() == 2 * 3 * 9
    assert (out[0, :, 1:4, 2:5] == 0).all() and (out[1, :, 4:7, 0:3] == 0).all()


def test_jitter_probability_zero_is_the_identity_and_one_always_moves():
    v = torch.randn(64, 2, 16, 16)
    assert torch.equal(jitter(v, probability=0.0), v)
    generator = torch.Generator().manual_seed(0)
    moved = jitter(v, probability=1.0, max_shift=2, blur_sigma=0.0, cutout_size=0, generator=generator)
    unchanged = (moved == v).flatten(1).all(dim=1)
    assert unchanged.float().mean() < 0.1  # only the draws of shift (0, 0): 1/25 of the samples
    # every sample is a whole-pixel shift of at most 2 of its source
    for sample, source in zip(moved, v):
        assert any(torch.equal(sample, shift(source[None], torch.tensor([dx]), torch.tensor([dy]))[0])
                   for dx in range(-2, 3) for dy in range(-2, 3))
    with pytest.raises(ValueError, match="cutout no larger than the 16 x 16 grid"):
        jitter(v, cutout_size=17)


def test_shift_robustness_is_one_for_a_shift_invariant_readout_and_falls_for_one_that_sees_layout():
    v = torch.randn(8, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    whole_map = MeanVarReadout(2, 8, 16, pool_levels=(1,))
    curve = shift_robustness(whole_map, v)
    assert curve[0].item() == pytest.approx(1.0, abs=1e-6)
    assert all(value.item() > 0.9 for value in curve.values())  # border repeats change the statistics a little
    cells = MeanVarReadout(2, 8, 16, pool_levels=(4,))
    layout_curve = shift_robustness(cells, v)
    assert layout_curve[0].item() == pytest.approx(1.0, abs=1e-6) and layout_curve[4] < curve[4]
