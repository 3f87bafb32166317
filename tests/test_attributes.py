"""Binary attribute rows, their combination codes and the spec's always-on flips (spec 001, FIX 2)."""

from __future__ import annotations

import pytest
import torch

from clustering.attributes import check_binary, codes_to_attributes, combination_codes, flip_attributes


def test_codes_are_bit_weights_and_invert():
    rows = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert combination_codes(rows).tolist() == [5, 0, 31]
    assert torch.equal(codes_to_attributes(combination_codes(rows), 5), rows)


def test_every_row_gets_one_or_two_flips():
    rows = torch.tensor([[1.0, 0, 1, 0, 0]]).repeat(2000, 1)
    flipped = flip_attributes(rows, torch.Generator().manual_seed(0))
    changed = (flipped != rows).sum(dim=1)
    assert set(changed.tolist()) == {1, 2}
    assert 0.45 < (changed == 1).float().mean() < 0.55
    assert ((flipped == 0) | (flipped == 1)).all()
    per_attribute = (flipped != rows).float().mean(dim=0)
    assert torch.allclose(per_attribute, torch.full((5,), 0.3), atol=0.04)  # 1.5 flips / 5 attributes


def test_binary_check_converts_celeba_signs_and_names_the_row():
    assert torch.equal(check_binary(torch.tensor([[-1.0, 1.0]])), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="row 1 is"):
        check_binary(torch.tensor([[0.0, 1.0], [0.5, 1.0]]), "attrs.npy")
    with pytest.raises(ValueError, match=r"shape \[N, A\]"):
        check_binary(torch.zeros(3))
