"""Collectives that every rank calls: global-batch negatives with gradients, evaluation outputs gathered."""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist

from modules.losses.contrastive import symmetric_info_nce


def _single_process(module: L.LightningModule) -> bool:
    return module._trainer is None or module.trainer.world_size == 1


def gather_with_gradients(module: L.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    """``rows [n, ...]`` of every rank (equal ``n``) concatenated in rank order, with gradients flowing
    back to each rank's own rows: in-batch negatives over the global batch."""
    if _single_process(module):
        return rows
    return module.all_gather(rows, sync_grads=True).flatten(0, 1)


def global_info_nce(module: L.LightningModule, z_a: torch.Tensor, z_b: torch.Tensor,
                    z_negative: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """P2's symmetric InfoNCE (``modules.losses.contrastive.symmetric_info_nce``) over the global batch: each rank's
    two views and extra negatives gathered with gradients, its positives at its own rows' offset."""
    rank = 0 if _single_process(module) else module.global_rank
    negatives = None if z_negative is None else gather_with_gradients(module, z_negative)
    return symmetric_info_nce(z_a, z_b, gather_with_gradients(module, z_a), gather_with_gradients(module, z_b),
                              negatives, rank * len(z_a), temperature)


def gather_rows(module: L.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    """Concatenate ``rows [n_r, ...]`` of every rank in rank order, when ranks hold different ``n_r``.

    ``all_gather`` needs equal shapes, so each rank pads to the largest ``n_r`` and the padding is
    cut away after the gather. Without a trainer or with one process this is the identity.
    """
    if _single_process(module):
        return rows
    counts = module.all_gather(torch.tensor(len(rows), device=rows.device)).flatten().tolist()
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: len(rows)] = rows
    gathered = module.all_gather(padded)  # [world, max_n, ...]
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])


def gather_outputs(module: L.LightningModule, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each name's rows of every batch of every rank, concatenated in rank order; ``{}`` when no rank
    has any. Called on every rank, also on one whose shard was empty (``batches == []``): it learns
    each name's trailing shape and dtype from the other ranks and takes part with no rows, where
    ``torch.cat([])`` would fail and leave the other ranks waiting in the gather."""
    local = {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]} if batches else {}
    if _single_process(module):
        return local
    layouts = [None] * module.trainer.world_size
    dist.all_gather_object(layouts, {name: (rows.shape[1:], rows.dtype) for name, rows in local.items()})
    layout = next((layout for layout in layouts if layout), {})
    for name, (shape, dtype) in layout.items():
        local.setdefault(name, torch.empty((0, *shape), dtype=dtype, device=module.device))
    return {name: gather_rows(module, local[name]) for name in layout}
