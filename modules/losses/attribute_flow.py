"""Losses of the attribute flow (spec 001, with issue 11's corrections).

Every input embedding is a unit row, so a cosine is a dot product; the math runs in float32. Nothing
here reads a value back to the host or indexes with a data-dependent mask: rows that do not take part
(a target combination without a prototype, an anchor without a positive) get weight zero, so a loss
keeps its shapes from batch to batch (CUDA-graph friendly) and a batch where nothing takes part gives
a zero that still carries the graph, never NaN.

A prototype row whose code is negative (``clustering.prototypes.EMPTY_KEY``; a combination with no
real examples) is no prototype: it is left out of every softmax, as a positive and as a negative.
"""

from __future__ import annotations

import torch

from clustering.attributes import combination_codes


def _check_rows(z: torch.Tensor, what: str) -> None:
    if z.dim() != 2:
        raise ValueError(f"{what} must have shape [N, D], got {tuple(z.shape)}")


def _check_codes(codes: torch.Tensor, length: int, what: str) -> None:
    if codes.shape != (length,) or codes.is_floating_point() or codes.dtype == torch.bool:
        raise ValueError(f"{what} must be {length} integer combination codes, "
                         f"got {tuple(codes.shape)} {codes.dtype}")


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def same_combination_mask(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` bool: True where attribute row ``a[i]`` and ``b[j]`` are bit-identical.

    The spec's public code used ``a @ b.T == A``, which counts shared ones, so only rows with all A
    attributes set were ever positives (issue 11).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"attribute rows must have shapes [N, A] and [M, A], "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    return combination_codes(a).unsqueeze(1) == combination_codes(b).unsqueeze(0)


def _masked_log_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    # The lowest finite float instead of -inf: a row with nothing allowed stays finite, so its zero
    # weight gives a zero, not NaN.
    return torch.log_softmax(logits.masked_fill(~allowed, torch.finfo(logits.dtype).min), dim=1)


def prototype_infonce(z_flowed: torch.Tensor, target_codes: torch.Tensor, prototypes: torch.Tensor,
                      prototype_codes: torch.Tensor,
                      temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of each flowed point against the prototypes of all combinations (spec FIX 3):
    ``-log exp(cos(z_i, p_{y_i}) / T) / sum_k exp(cos(z_i, p_k) / T)``, ``p_{y_i}`` the prototype whose
    code is the row's target code, averaged over the rows that have one.

    ``prototypes [K, D]`` are unit rows with distinct ``prototype_codes [K]`` (negative: no prototype).
    Returns the loss and the number of rows excluded because their target combination has no
    prototype (an int64 tensor; issue 11 logs it).
    """
    _check_rows(z_flowed, "flowed points")
    _check_rows(prototypes, "prototypes")
    if prototypes.shape[1] != z_flowed.shape[1]:
        raise ValueError(f"prototypes {tuple(prototypes.shape)} and flowed points {tuple(z_flowed.shape)} "
                         "differ in width")
    _check_codes(target_codes, len(z_flowed), "target codes")
    _check_codes(prototype_codes, len(prototypes), "prototype codes")
    _check_temperature(temperature)
    filled = (prototype_codes >= 0).unsqueeze(0)
    positive = (target_codes.unsqueeze(1) == prototype_codes.unsqueeze(0)) & filled
    log_probabilities = _masked_log_softmax(z_flowed.float() @ prototypes.float().T / temperature,
                                            filled.expand_as(positive))
    included = positive.any(dim=1)
    row_losses = -torch.where(positive, log_probabilities, 0.0).sum(dim=1)
    loss = torch.where(included, row_losses, 0.0).sum() / included.sum().clamp(min=1)
    return loss, (~included).sum()


def batch_mean_prototypes(z_flowed: torch.Tensor,
                          target_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's literal prototypes (FIX 3): ``normalize(mean of the flowed points per target combination
    in the batch)``, gradients kept.

    Returns ``[N, D]`` and codes ``[N]``, one row per batch row so the shapes do not depend on the batch:
    row ``i`` holds the prototype of row ``i``'s combination and its code where ``i`` is that
    combination's first row, and code -1 (no prototype) elsewhere.
    """
    _check_rows(z_flowed, "flowed points")
    _check_codes(target_codes, len(z_flowed), "target codes")
    same = target_codes.unsqueeze(1) == target_codes.unsqueeze(0)
    means = same.float() @ z_flowed.float() / same.sum(dim=1, keepdim=True)
    earlier = torch.ones_like(same).tril(diagonal=-1)
    first = ~(same & earlier).any(dim=1)
    return torch.nn.functional.normalize(means, dim=1), torch.where(first, target_codes, -1)


def supervised_contrastive(z_flowed: torch.Tensor, target_attributes: torch.Tensor,
                           temperature: float = 0.1) -> torch.Tensor:
    """SupCon (Khosla et al. 2020, eq. 2, L_out) over the batch: for anchor ``i`` with positives ``P(i)``,
    the other rows whose target attributes are bit-identical to its own (issue 11's mask),
    ``-1/|P(i)| sum_{p in P(i)} log exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T)``, averaged over
    the anchors that have a positive.
    """
    _check_rows(z_flowed, "flowed points")
    if target_attributes.dim() != 2 or len(target_attributes) != len(z_flowed):
        raise ValueError(f"target attributes must have shape [{len(z_flowed)}, A], "
                         f"got {tuple(target_attributes.shape)}")
    _check_temperature(temperature)
    others = ~torch.eye(len(z_flowed), dtype=torch.bool, device=z_flowed.device)
    positive = same_combination_mask(target_attributes, target_attributes) & others
    z = z_flowed.float()
    log_probabilities = _masked_log_softmax(z @ z.T / temperature, others)
    num_positives = positive.sum(dim=1)
    anchor_losses = -torch.where(positive, log_probabilities, 0.0).sum(dim=1) / num_positives.clamp(min=1)
    anchors = num_positives > 0
    return torch.where(anchors, anchor_losses, 0.0).sum() / anchors.sum().clamp(min=1)


def identity_loss(z_flowed: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``mean_i ||z_flowed_i - z_i||^2`` (the module weighs it 0.05, spec FIX 1)."""
    if z_flowed.shape != z.shape or z.dim() != 2:
        raise ValueError(f"flowed and source points must both have shape [N, D], got {tuple(z_flowed.shape)} "
                         f"and {tuple(z.shape)}")
    return (z_flowed.float() - z.float()).pow(2).sum(dim=1).mean()


def separation_loss(z_flowed: torch.Tensor, z_wrong: torch.Tensor) -> torch.Tensor:
    """The spec's optional repulsion (FIX 4, weight 0.2): ``-mean((z_flowed - z_wrong)^2)`` over every
    element, as the spec writes it, ``z_wrong`` the flow toward a wrong target."""
    if z_flowed.shape != z_wrong.shape or z_wrong.dim() != 2:
        raise ValueError(f"flowed and wrong-target points must both have shape [N, D], got "
                         f"{tuple(z_flowed.shape)} and {tuple(z_wrong.shape)}")
    return -(z_flowed.float() - z_wrong.float()).pow(2).mean()
