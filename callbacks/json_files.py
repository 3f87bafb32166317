"""JSON files that runs leave behind (metrics, gate reports), written so a reader never sees half a file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


def write_json_atomically(path: Path, record: dict) -> None:
    """Indented JSON at ``path``, written beside it first and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)


def finite_or_none(value: torch.Tensor | float) -> float | None:
    """A number for JSON: NaN and infinities become ``null`` (JSON has no literal for them)."""
    number = float(value)
    return number if math.isfinite(number) else None
