"""Binary attribute vectors and their combinations (spec 001; issue 11).

Attributes are float tensors of 0.0 and 1.0, ``[N, A]``. A combination is the integer code
``sum_a attributes[:, a] * 2**a``, so ``A`` attributes have ``2**A`` combinations and two rows share a
code exactly when they are bit-identical.
"""

from __future__ import annotations

import torch

MAX_ATTRIBUTES = 62  # codes are int64


def check_binary(attributes: torch.Tensor, source: str = "attributes") -> torch.Tensor:
    """``attributes`` as float32 ``[N, A]``; anything but 0 and 1 (or -1 and 1, CelebA's form) is an error
    naming the first offending row."""
    if attributes.dim() != 2 or not 1 <= attributes.shape[1] <= MAX_ATTRIBUTES:
        raise ValueError(f"{source}: attributes must have shape [N, A] with 1 <= A <= {MAX_ATTRIBUTES}, "
                         f"got {tuple(attributes.shape)}")
    values = attributes.float()
    if bool(((values == -1) | (values == 1)).all()) and bool((values == -1).any()):
        values = (values + 1) / 2  # -1/1 (CelebA) to 0/1
    bad = ~((values == 0) | (values == 1)).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"{source}: attributes must be binary (0/1 or -1/1); row {row} is "
                         f"{attributes[row].tolist()} ({int(bad.sum())} such rows)")
    return values


def combination_codes(attributes: torch.Tensor) -> torch.Tensor:
    """``[N]`` int64 codes ``sum_a attributes[:, a] * 2**a``."""
    powers = 2 ** torch.arange(attributes.shape[1], device=attributes.device)
    return (attributes.round().long() * powers).sum(dim=1)


def codes_to_attributes(codes: torch.Tensor, num_attributes: int) -> torch.Tensor:
    """The inverse of ``combination_codes``: float ``[N, num_attributes]``."""
    powers = 2 ** torch.arange(num_attributes, device=codes.device)
    return ((codes.unsqueeze(1) & powers) > 0).float()


def flip_attributes(attributes: torch.Tensor, generator: torch.Generator, max_flips: int = 2) -> torch.Tensor:
    """Each row with ``1..max_flips`` of its attributes flipped (how many and which uniformly; spec FIX 2,
    applied to every sample). Draws from ``generator`` on the host."""
    num, num_attributes = attributes.shape
    max_flips = min(max_flips, num_attributes)
    flips = torch.randint(1, max_flips + 1, (num,), generator=generator)
    order = torch.rand(num, num_attributes, generator=generator).argsort(dim=1)
    flipped = torch.zeros(num, num_attributes, dtype=torch.bool)
    flipped.scatter_(1, order, torch.arange(num_attributes).expand(num, -1) < flips.unsqueeze(1))
    return torch.where(flipped, 1.0 - attributes, attributes)
