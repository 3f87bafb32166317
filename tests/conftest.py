"""Shared test setup: W&B disabled, two CPU threads (one per worker when pytest-xdist runs two), small
data written in the real formats."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (``make test`` runs two workers) each worker and the processes it launches take
# one thread, so two workers do not fight over two cores.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if THREADS == 1:
    os.environ["OMP_NUM_THREADS"] = "1"

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)
REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def blob_data(num_per_cluster: int = 40, num_clusters: int = 4, dim: int = 16, seed: int = 0):
    """Well separated Gaussian blobs: embeddings [N, dim] float32 and labels [N] int64."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_clusters, dim)) * 4
    labels = np.repeat(np.arange(num_clusters), num_per_cluster)
    x = centers[labels] + rng.normal(size=(len(labels), dim))
    return x.astype(np.float32), labels.astype(np.int64)


@pytest.fixture
def blob_files(tmp_path: Path) -> dict[str, Path]:
    x, y = blob_data()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return {"embeddings": tmp_path / "x.npy", "labels": tmp_path / "y.npy", "dir": tmp_path}


# Small heads that train in seconds on the CPU; the CLI tests pass the same as --model.init_args.*.
TINY_TEMI = {
    "num_heads": 4, "hidden_dim": 64, "bottleneck_dim": 32, "warmup_epochs": 1, "lr": 1e-3, "min_lr_factor": 1.0,
    # A few dozen steps only: a teacher EMA of 0.996 would barely move in that time.
    "teacher_momentum": 0.9, "final_teacher_momentum": 0.9,
}


def mean_cosine_between_rows(states: torch.Tensor) -> float:
    """The mean cosine between different rows of each ``[N, D]`` matrix of ``states [..., N, D]``, averaged over
    the leading dimensions (how alike a network's initial states are)."""
    unit = torch.nn.functional.normalize(states, dim=-1)
    count = states.shape[-2]
    off_diagonal = (unit @ unit.transpose(-1, -2)).sum(dim=(-2, -1)) - count
    return float((off_diagonal / (count * count - count)).mean())


def quiet_trainer(epochs: int, root: Path, callbacks=(), **kwargs) -> L.Trainer:
    """A CPU Trainer for in-process fits: no logger, progress bar or model summary."""
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kwargs)


class StopAfterEpoch(Callback):
    """Ends fit after ``epoch`` as an interruption would, leaving the schedule of the full run intact."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def offline_hub():
    """No test may reach the hub; huggingface_hub reads the variable at import, so patch its constant too."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A tiny randomly initialized DINOv2 and its processor saved to a folder: a local model, nothing downloaded."""
    from transformers import AutoImageProcessor, BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("tiny-dinov2")
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8,
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    AutoImageProcessor.from_pretrained(folder, local_files_only=True)  # what the module under test will do
    return folder
