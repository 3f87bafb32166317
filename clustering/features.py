"""Checks on feature tables (one row per item), shared by the array readers, k-means and the tools."""

from __future__ import annotations

import torch


def nonfinite_rows(array: torch.Tensor) -> torch.Tensor:
    """Indices of the rows ``array[i]`` (any shape after the first axis) holding a NaN or inf."""
    return (~torch.isfinite(array.flatten(1)).all(dim=1)).nonzero().flatten()
