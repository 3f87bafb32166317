"""What every benchmark writes beside its numbers: the machine and the command that produced them."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch


def write_record(out: str | Path, record: dict, threads: int) -> None:
    """``record`` plus ``machine`` and ``command``, as indented JSON in ``out``."""
    record = record | {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": threads, "torch": torch.__version__},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2) + "\n")
