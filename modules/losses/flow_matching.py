"""Flow matching with a locality term (spec 000), as pure functions.

Conditional flow matching on the linear path (Lipman et al. 2023; Liu et al. 2023):
``x_t = (1 - t) x0 + t x1`` with target velocity ``u = x1 - x0``, loss ``E ||v(x_t, t) - u||^2``.

The spec's locality term ``lambda ||v(u_t, t) - v(s_t, t)||^2`` compares the velocity at the
sample's point ``u_t`` with the velocity at a partner point ``s_t`` at the same ``t``:

* ``random_perturbation``: ``s_t`` starts from ``x0 + scale * noise`` towards the same ``x1``;
* ``cluster_neighborhood``: ``s_t`` starts from the same ``x0`` towards a cluster-mate's ``x1``.

Both terms average over dimensions (the spec's squared norms divided by the dimension), so
``lambda`` weighs them on one scale whatever the data size. Note that in cluster mode the two
points have different targets (``x1_i - x0`` and ``x1_j - x0``): a perfect flow model would give
``v(u_t) - v(s_t) ~ x1_i - x1_j``, so the locality term pulls against the flow loss by about
``locality_target_diff`` (logged) unless cluster-mates are nearly identical. The residual form
(``residual_locality_loss``) compares the pair's errors instead, ``(v(u_t) - u_i) - (v(s_t) - u_j)``.
"""

from __future__ import annotations

import torch


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.shape != like.shape[:1]:
        raise ValueError(f"t must hold one time per sample, shape [{len(like)}]; got {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.dim() - 1)))


def linear_path(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t x1`` for per-sample times ``t [B]``."""
    t = _per_sample(t, x1)
    return (1 - t) * x0 + t * x1


def flow_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The conditional velocity of the linear path, ``d x_t / dt = x1 - x0``."""
    return x1 - x0


def mean_squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over dimensions of ``(a - b)^2``: ``[B]``."""
    return (a - b).pow(2).flatten(1).mean(dim=1)


def flow_matching_loss(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``E ||v(x_t, t) - (x1 - x0)||^2 / D``."""
    return mean_squared(velocity, target).mean()


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [B]`` over ``valid``; 0 when nothing is valid (for logged statistics)."""
    return torch.where(valid, values, 0.0).sum() / valid.sum().clamp_min(1)


def locality_loss(velocity: torch.Tensor, partner_velocity: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Spec 000: ``mean over valid pairs of ||v(u_t, t) - v(s_t, t)||^2 / D``; 0 without a valid pair.

    Masked pairs' differences are replaced by 0 with ``torch.where`` (no boolean indexing, which
    would read the number of valid pairs on the host), so they send back no gradient, not even a
    NaN, which a product with the mask would pass on.
    """
    rows = valid.view(-1, *([1] * (velocity.dim() - 1)))
    difference = torch.where(rows, velocity - partner_velocity, 0.0)
    return difference.pow(2).flatten(1).mean(dim=1).sum() / valid.sum().clamp_min(1)


def residual_locality_loss(velocity: torch.Tensor, target: torch.Tensor, partner_velocity: torch.Tensor,
                           partner_target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The residual form (issue 14): ``mean over valid pairs of ||(v_i - u_i) - (v_j - u_j)||^2 / D``.

    A pair must share its errors rather than its velocities: zero for any field that fits both targets,
    so, unlike the spec's term, it does not ask the field to ignore the difference of the pair's targets.
    Masked as ``locality_loss``."""
    return locality_loss(velocity - target, partner_velocity - partner_target, valid)


def perturbed_source(x0: torch.Tensor, noise: torch.Tensor, scale: float) -> torch.Tensor:
    """``x0 + scale * noise``, the random-perturbation partner's start (spec 000, mode 1; scale 0.1);
    ``noise ~ N(0, I)`` is the item's own draw (``batch["noise"]``)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    return x0 + scale * noise


def cluster_mate_pairs(cluster_ids: torch.Tensor, item_ids: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair every sample with a uniformly drawn other sample of its cluster in the batch (spec 000,
    "Pairing Strategy").

    Returns ``(partner [B], valid [B])``. A sample without a cluster-mate is paired with itself and
    marked invalid. With ``item_ids`` (dataset indices), a repeat of the same item is not a mate.
    """
    if cluster_ids.dim() != 1:
        raise ValueError(f"cluster_ids must be [B], got shape {tuple(cluster_ids.shape)}")
    batch = len(cluster_ids)
    mates = cluster_ids.unsqueeze(0) == cluster_ids.unsqueeze(1)
    if item_ids is not None:
        mates &= item_ids.unsqueeze(0) != item_ids.unsqueeze(1)
    mates.fill_diagonal_(False)
    scores = torch.rand(batch, batch, generator=generator, device=cluster_ids.device)
    partner = torch.where(mates, scores, -1.0).argmax(dim=1)
    valid = mates.any(dim=1)
    return torch.where(valid, partner, torch.arange(batch, device=cluster_ids.device)), valid
