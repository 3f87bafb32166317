"""TEMIClustering: learning happens, bad steps are skipped, the last layer starts frozen, resume is exact."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.random_state import RandomState
from datamodules.embeddings import EmbeddingsDataModule
from modules.temi import TEMIClustering
from tests.conftest import TINY_TEMI, quiet_trainer


class EpochLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.losses.append(trainer.callback_metrics["train/loss_epoch"].item())


def blob_module(blob_files, batch_size=32, **overrides):
    data = EmbeddingsDataModule(embeddings=str(blob_files["embeddings"]), labels=str(blob_files["labels"]),
                                knn=5, batch_size=batch_size, seed=0)
    model = TEMIClustering(input_dim=data.input_dim, num_clusters=data.num_clusters, num_classes=data.num_classes,
                           batch_size=batch_size, **(TINY_TEMI | overrides))
    return model, data


def test_smoke_fit_learns_clusters(blob_files, tmp_path):
    L.seed_everything(0)
    model, data = blob_module(blob_files)
    losses = EpochLosses()
    quiet_trainer(12, tmp_path, [losses], enable_checkpointing=False).fit(model, data)
    metrics = quiet_trainer(1, tmp_path, enable_checkpointing=False).validate(model, data, verbose=False)[0]
    assert losses.losses[-1] < losses.losses[0] - 0.3
    assert metrics["val/acc"] > 0.9  # chance is about 0.3 for 4 balanced clusters
    assert metrics["val/clusters_used"] >= 3
    assert "val/head3/nmi" in metrics and 0 <= metrics["val/best_head"] < 4


def test_last_layer_is_frozen_during_the_first_epoch(blob_files, tmp_path):
    L.seed_everything(0)
    model, data = blob_module(blob_files, freeze_last_layer_epochs=1)
    initial = [p.clone() for p in model.student.last_layer.parameters()]
    first_layer = [p.clone() for p in model.student.parameters()][0]
    quiet_trainer(1, tmp_path, enable_checkpointing=False).fit(model, data)
    assert all(torch.equal(a, b) for a, b in zip(initial, model.student.last_layer.parameters()))
    assert not torch.equal(first_layer, next(model.student.parameters()))
    quiet_trainer(2, tmp_path, enable_checkpointing=False).fit(model, data)
    assert not all(torch.equal(a, b) for a, b in zip(initial, model.student.last_layer.parameters()))


def test_non_finite_loss_skips_the_step_and_stops_after_a_streak(blob_files):
    model, data = blob_module(blob_files, max_nonfinite_steps=3)
    x = torch.full((8, data.input_dim), float("nan"))
    batch = {"x": x, "x_pair": x}
    marginal = model.marginal.clone()
    assert model.training_step(batch, 0) is None
    assert model.training_step(batch, 1) is None
    assert torch.equal(model.marginal, marginal)  # a skipped step changes no state
    assert model.nonfinite_total.item() == 2
    good = torch.randn(8, data.input_dim)
    assert torch.isfinite(model.training_step({"x": good, "x_pair": good}, 2))
    assert model.nonfinite_streak.item() == 0
    for step in range(2):
        model.training_step(batch, 3 + step)
    with pytest.raises(FloatingPointError, match="NaN or inf for 3 steps in a row"):
        model.training_step(batch, 5)


@pytest.mark.parametrize("heads", ["temi", "spec"])
def test_resume_is_exact(blob_files, tmp_path, heads):
    """Stopped after epoch 2 of 4 and resumed == uninterrupted (weights, teacher, p(k), optimizer, metrics)."""
    overrides = {"heads": heads} if heads == "temi" else {"heads": "spec", "hidden_dim": 64, "dropout": 0.2}

    def run(root, epochs, ckpt_path=None):
        L.seed_everything(0)
        model, data = blob_module(blob_files, **overrides)
        checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
        fit_trainer = quiet_trainer(epochs, root, [checkpoint, RandomState()])
        fit_trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, fit_trainer

    straight, straight_trainer = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed, resumed_trainer = run(tmp_path / "resumed", 4, ckpt_path=str(tmp_path / "resumed/checkpoints/last.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    opt_a = straight_trainer.optimizers[0].state_dict()["state"]
    opt_b = resumed_trainer.optimizers[0].state_dict()["state"]
    assert all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a)
    for name in ("val/acc", "val/nmi", "train/loss_epoch"):
        assert straight_trainer.callback_metrics[name] == resumed_trainer.callback_metrics[name], name
