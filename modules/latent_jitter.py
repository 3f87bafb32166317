"""Spatial jitter ``T`` of a latent grid (spec 004, P3 "Stabilize to Spatial Jitter"): shifts of up to a few
pixels, a mild blur and a small cutout, drawn per sample on the latent's device (no host sync).

A shift moves the content by whole pixels and repeats the border into the uncovered strip: the latent's
maps have channel-wide levels, and filling with zeros would paint an edge the readout could key on.
"""

from __future__ import annotations

import torch

from modules.losses.image_priors import gaussian_blur


def shift(v: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``v [B, C, H, W]`` moved by ``dx [B]`` pixels right and ``dy [B]`` down (integers, signed), the
    border repeated: ``out[b, :, i, j] = v[b, :, clamp(i - dy), clamp(j - dx)]``."""
    b, c, h, w = v.shape
    rows = (torch.arange(h, device=v.device) - dy.view(b, 1)).clamp(0, h - 1)  # [B, H]
    cols = (torch.arange(w, device=v.device) - dx.view(b, 1)).clamp(0, w - 1)  # [B, W]
    index = (rows.view(b, 1, h, 1) * w + cols.view(b, 1, 1, w)).expand(b, c, h, w)
    return v.flatten(2).gather(2, index.flatten(2)).view(b, c, h, w)


def cutout(v: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """``v`` with the ``size x size`` square at ``(top [B], left [B])`` set to zero in every channel."""
    b, _, h, w = v.shape
    rows = torch.arange(h, device=v.device).view(1, h, 1)
    cols = torch.arange(w, device=v.device).view(1, 1, w)
    inside = ((rows >= top.view(b, 1, 1)) & (rows < top.view(b, 1, 1) + size)
              & (cols >= left.view(b, 1, 1)) & (cols < left.view(b, 1, 1) + size))
    return v.masked_fill(inside.unsqueeze(1), 0.0)


def jitter(v: torch.Tensor, probability: float = 0.5, max_shift: int = 2, blur_sigma: float = 0.5,
           cutout_size: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Spec P3's ``T``: each sample is jittered with ``probability``; a jittered sample is shifted by
    ``dx, dy`` uniform in ``[-max_shift, max_shift]``, blurred (``blur_sigma``) with probability 1/2 and
    given a ``cutout_size`` square cutout with probability 1/2. ``blur_sigma`` or ``cutout_size`` 0 leaves
    that part out."""
    b, _, h, w = v.shape
    if cutout_size > min(h, w) or max_shift < 0 or not 0 <= probability <= 1:
        raise ValueError(f"jitter needs 0 <= probability <= 1, max_shift >= 0 and a cutout no larger than the "
                         f"{h} x {w} grid; got probability={probability}, max_shift={max_shift}, "
                         f"cutout_size={cutout_size}")

    def uniform(shape=(b,)) -> torch.Tensor:
        return torch.rand(shape, device=v.device, generator=generator)

    jittered = uniform() < probability
    offsets = torch.randint(-max_shift, max_shift + 1, (2, b), device=v.device, generator=generator)
    offsets = offsets * jittered
    out = shift(v, offsets[0], offsets[1])
    if blur_sigma > 0:
        blurred = jittered & (uniform() < 0.5)
        out = torch.where(blurred.view(b, 1, 1, 1), gaussian_blur(out, blur_sigma), out)
    if cutout_size > 0:
        cut = jittered & (uniform() < 0.5)
        top = (uniform() * (h - cutout_size + 1)).long()
        left = (uniform() * (w - cutout_size + 1)).long()
        out = torch.where(cut.view(b, 1, 1, 1), cutout(out, top, left, cutout_size), out)
    return out


ROBUSTNESS_SHIFTS = (0, 1, 2, 3, 4)


@torch.no_grad()
def shift_robustness(readout: torch.nn.Module, v: torch.Tensor,
                     shifts: tuple[int, ...] = ROBUSTNESS_SHIFTS) -> dict[int, torch.Tensor]:
    """Spec P3 "Robustness": ``cos(g(V), g(shift(V, s)))`` per shift ``s`` in pixels, averaged over the
    items and the four directions (right, left, down, up)."""
    z = torch.nn.functional.normalize(readout(v).float(), dim=1)
    zero = torch.zeros(len(v), dtype=torch.long, device=v.device)
    curve = {}
    for s in shifts:
        moved = [shift(v, zero + dx, zero + dy) for dx, dy in ((s, 0), (-s, 0), (0, s), (0, -s))]
        z_moved = torch.nn.functional.normalize(readout(torch.cat(moved)).float(), dim=1)
        curve[s] = (z_moved.view(4, len(v), -1) * z).sum(dim=-1).mean()
    return curve
